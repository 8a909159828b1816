//! Operator commands: sessions list/revoke, rotate-keys (being written).
