mod approvals;

pub use approvals::Approved;

pub fn key() -> Approved {
    Approved
}
