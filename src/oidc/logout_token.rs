//! OpenID Connect Back-Channel Logout 1.0: validating logout tokens (being written).
