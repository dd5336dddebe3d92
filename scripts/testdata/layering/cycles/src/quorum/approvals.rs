use crate::keys::KeyId;

pub struct Approved;

fn id() -> KeyId {
    KeyId
}
