#![doc = include_str!("../README.md")]
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod builder;
pub mod entry;
pub mod ept;
pub mod memory;
pub mod nested;
pub mod shadow;
pub mod tlb;
pub mod walk;

pub use memory::{FlatMemory, GuestAddress, PhysMemory, WordSpan};
