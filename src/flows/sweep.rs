//! The expired-session sweep (being written).
