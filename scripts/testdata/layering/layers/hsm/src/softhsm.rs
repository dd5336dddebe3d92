pub fn init_token() {}
