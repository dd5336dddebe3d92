fn main() {
    arca::service::run()
}
