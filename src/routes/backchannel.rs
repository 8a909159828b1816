//! `POST /backchannel-logout` (being written).
