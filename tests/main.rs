//! The integration tests, one binary (linking is slow): each module tests one stage.
