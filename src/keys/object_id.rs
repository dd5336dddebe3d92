//! [`ObjectId`]: the `CKA_ID` of a key version's HSM object, as the layers above `keys/`
//! see it (the store keeps it, the service hands it back to the [`super::KeyEngine`]).
//!
//! Invariants:
//! - Same bytes, same text as the HSM crate's id: `Display` is 32 lowercase hex digits (the
//!   stored form), `Debug` is `ObjectId(<hex>)`.
//! - The conversion to and from `arca_hsm::ObjectId` lives here and nowhere else: only
//!   `keys/` names the HSM crate's types.
//!
//! Must not import: tonic, prost, sqlx, cryptoki.

use std::fmt;

/// The `CKA_ID` of an HSM key object: 16 bytes, unique per object.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectId(pub [u8; 16]);

impl ObjectId {
    /// The id as bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl From<arca_hsm::ObjectId> for ObjectId {
    fn from(id: arca_hsm::ObjectId) -> Self {
        ObjectId(id.0)
    }
}

impl From<ObjectId> for arca_hsm::ObjectId {
    fn from(id: ObjectId) -> Self {
        arca_hsm::ObjectId(id.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_as_the_hsm_crate_does_and_converts_both_ways() {
        let raw = [0x0f, 0xa0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0xff];
        let ours = ObjectId(raw);
        let theirs = arca_hsm::ObjectId(raw);
        assert_eq!(ours.to_string(), theirs.to_string());
        assert_eq!(format!("{ours:?}"), format!("{theirs:?}"));
        assert_eq!(ours.to_string(), "0fa00102030405060708090a0b0c0dff");
        assert_eq!(ObjectId::from(theirs), ours);
        assert_eq!(arca_hsm::ObjectId::from(ours), theirs);
        assert_eq!(ours.as_bytes(), &raw);
    }
}
