//! The Intel VT-d remapping hardware model (Intel Virtualization Technology for Directed I/O
//! Architecture Specification, rev 4.1), organised like the specification's chapters:
//! - [`registers`]: the register file of a remapping unit (chapter 11), with the Global
//!   Command/Status semantics Linux relies on, fault recording and the invalidation queue
//!   registers;
//! - [`tables`]: legacy-mode root and context entries and the second-stage walk (chapters 9
//!   and 3.6), with the architected fault reasons;
//! - [`scalable`]: scalable-mode root/context entries, PASID directory and table entries, and
//!   the first-stage (x86 4-level) walk with Accessed/Dirty updates;
//! - [`unit`]: one remapping unit — registers, queued invalidation, fault and invalidation
//!   events, and the translation of DMA requests ([`unit::VtdTranslator`], the
//!   `DmaTranslator` for the devices behind the unit);
//! - [`cache`]: caching translation information (chapter 6) — the context cache, PASID cache
//!   and IOTLB, and their invalidation at every granularity;
//! - [`page_request`]: page requests (chapter 7.5) — the descriptors of the page request queue
//!   and of the page group response.
//!
//! Device TLBs (ATS, chapter 4): the unit answers translation requests of devices whose
//! context enables the device TLB, and forwards device-TLB invalidations to them.

pub mod cache;
pub mod page_request;
pub mod registers;
pub mod scalable;
pub mod tables;
pub mod unit;
