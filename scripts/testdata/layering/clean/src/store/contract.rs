//! Declared under #[cfg(test)]: test code, not checked.
use crate::service::Caller;
use super::helper;
