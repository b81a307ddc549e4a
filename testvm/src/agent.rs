//! agent placeholder
