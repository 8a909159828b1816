//! Back-channel logout: ending the sessions a logout token names (being written).
