use crate::Hsm;
pub struct Fake;
impl Hsm for Fake {}
