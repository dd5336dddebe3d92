pub fn classify() {
    super::lifecycle::reserve();
}
