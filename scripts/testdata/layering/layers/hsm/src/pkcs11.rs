use cryptoki::context::Pkcs11;
use crate::softhsm::init_token;
