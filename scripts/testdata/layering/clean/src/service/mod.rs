//! service: the top layer of this tree.
use crate::store::{self, Pool};

pub struct Caller;

pub fn run() {
    let _ = Pool.get();
    let _ = store::StoreError;
    let _ = crate::keys::stamp(&crate::clock::Clock);
}

#[cfg(test)]
mod tests;
