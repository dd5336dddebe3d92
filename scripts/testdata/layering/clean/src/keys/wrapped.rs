use super::KeyId;

pub const HEADER_LEN: usize = 1;
pub struct WrappedKey(pub KeyId);
