pub mod pkcs11;
pub mod softhsm;

pub fn init() {
    softhsm::init_token()
}
