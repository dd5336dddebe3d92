//! Unit tests in their own file may reach anywhere.
use super::*;
use crate::store::Pool;
