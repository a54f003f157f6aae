//! The packet layer's user side: the XDP program's loading, pinning and attachment, its
//! typed maps, and the allow tables it reads.

pub mod maps;
pub mod probe;
pub mod tables;
pub mod xdp;
