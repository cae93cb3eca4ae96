//! DMA API.
