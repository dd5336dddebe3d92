use super::sql::{self};

pub(super) fn reserve() {
    sql::classify()
}
