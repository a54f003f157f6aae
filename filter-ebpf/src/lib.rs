#![no_std]
// Empty: aya-build expects the eBPF package to carry a library target next to its binary.
