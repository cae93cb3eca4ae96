//! One Crystal Beach 3 DMA channel: its registers (CHANCTRL, CHANCMD, DMACOUNT, CHANSTS,
//! CHAINADDR, CHANCMP, CDAR, CHANERR and its mask) and the engine that walks the guest's
//! descriptor chain.
//!
//! The semantics are the ones `drivers/dma/ioat/dma.c` and the VFIO selftests'
//! `lib/drivers/ioat/ioat.c` rely on:
//! - writing CHAINADDR points the channel at a chain and restarts its descriptor count
//!   (`__ioat_restart_chan()` writes CHAINADDR and then counts DMACOUNT up from 0);
//! - DMACOUNT is the doorbell: the channel executes descriptors, following each one's `next`
//!   pointer, until the number it completed since CHAINADDR was written equals DMACOUNT
//!   (16 bits, wrapping). A halted channel starts again only once its errors are cleared (after
//!   a reset, `ioat_reset_hw()`); a suspended one resumes;
//! - CHANSTS holds the last completed descriptor's address and the state: active, done,
//!   suspended or halted (halted after a reset — the selftests assert it — and on an error);
//! - a descriptor with `compl_write` writes CHANSTS to CHANCMP; one with `int_en` interrupts
//!   when CHANCTRL's re-arm bit is set, and clears it (`ioat_cleanup_event()` re-arms). An
//!   interrupt that finds the channel disarmed is held until the re-arm;
//! - an error stops the channel (this engine always aborts, as with ANY_ERR_ABORT_EN): CHANERR
//!   gets one bit, CHANSTS says halted, the completion status is written if
//!   ERR_COMPLETION_EN and an interrupt raised if ERR_INT_EN (and the bit is not masked).
//!   A failed source read is READ_DATA, a failed destination write WRITE_DATA — the two
//!   errors `ioat_eh()` recovers from by aborting the descriptor — and a descriptor that cannot
//!   be fetched is NEXT_ADDR, which the driver's timer handles by resetting the channel.
//!
//! The engine runs synchronously, inside the doorbell write, so a guest never sees "active";
//! it is bounded by the 16-bit DMACOUNT (at most 65 535 descriptors of at most XFERCAP bytes).

use iommu::{DmaError, DmaSpace};
use zerocopy::FromBytes;

use super::descriptor::{self, DmaDescriptor, ctl, op};
use super::registers::{chanerr, channel as reg};

/// What a channel has done, for tests, the control API and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelCounters {
    /// Descriptors completed.
    pub descriptors: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Errors that halted the channel.
    pub errors: u64,
    /// Completion interrupts and error interrupts requested.
    pub interrupts: u64,
}

/// A channel's state.
#[derive(Debug, Default)]
pub struct Channel {
    chanctrl: u16,
    dmacount: u16,
    /// Descriptors completed since CHAINADDR was last written (compared with DMACOUNT).
    completed: u16,
    chainaddr: u64,
    next_descriptor: u64,
    chancmp: u64,
    last_completed: u64,
    current: u64,
    status: u64,
    chanerr: u32,
    chanerr_mask: u32,
    dcactrl: u32,
    interrupt_held: bool,
    counters: ChannelCounters,
}

/// What the function must do after a channel register access.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct ChannelEvents {
    /// Raise the channel's interrupt.
    pub interrupt: bool,
}

/// The engine's resources, lent to a channel while it runs.
pub struct Engine<'a> {
    /// The function's DMA space (translated by the IOMMU, refused without Bus Master Enable).
    pub dma: &'a DmaSpace,
    /// XFERCAP: the largest transfer one descriptor may ask for is `1 << xfercap_log`.
    pub xfercap_log: u8,
    /// Scratch buffer for copies (kept by the function to avoid an allocation per descriptor).
    pub buffer: &'a mut Vec<u8>,
}

impl Channel {
    /// A channel after power-on: halted, nothing programmed.
    pub fn new() -> Self {
        Channel {
            status: reg::STATUS_HALTED,
            ..Default::default()
        }
    }

    /// Back to power-on (Function Level Reset): every register, the configuration too. The
    /// counters are the VMM's, not the guest's, and survive.
    pub fn power_on_reset(&mut self) {
        let counters = self.counters;
        *self = Channel::new();
        self.counters = counters;
    }

    /// CHANSTS: the last completed descriptor's address and the channel state.
    pub fn chansts(&self) -> u64 {
        (self.last_completed & reg::CHANSTS_ADDRESS_MASK) | self.status
    }

    /// The state field of CHANSTS.
    pub fn status(&self) -> u64 {
        self.status
    }

    /// CHANERR.
    pub fn chanerr(&self) -> u32 {
        self.chanerr
    }

    /// What the channel has done.
    pub fn counters(&self) -> ChannelCounters {
        self.counters
    }

    /// Reads the DWORD at `offset` in the channel's register block.
    pub fn read_dword(&self, offset: u64) -> u32 {
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match offset {
            reg::CHANCTRL => u32::from(self.chanctrl) | (2u32 << 16), // DMA_COMP: CB2+ layout
            reg::CHANCMD => u32::from(self.dmacount) << 16, // CHANCMD reads 0: commands complete at once
            reg::CHANSTS => lo(self.chansts()),
            0x0c => hi(self.chansts()),
            reg::CHAINADDR => lo(self.chainaddr),
            0x14 => hi(self.chainaddr),
            reg::CHANCMP => lo(self.chancmp),
            0x1c => hi(self.chancmp),
            reg::CDAR => lo(self.current),
            0x24 => hi(self.current),
            reg::CHANERR => self.chanerr,
            reg::CHANERR_MASK => self.chanerr_mask,
            reg::DCACTRL => self.dcactrl,
            _ => 0,
        }
    }

    /// Writes the bytes of `value` selected by `enables` to the DWORD at `offset`; runs the
    /// engine when the doorbell (DMACOUNT) or a resume asks for it.
    pub fn write_dword(
        &mut self,
        offset: u64,
        value: u32,
        enables: u32,
        engine: &mut Engine<'_>,
    ) -> ChannelEvents {
        let merge = |old: u32| (old & !enables) | (value & enables);
        let set_lo = |old: u64| (old & !0xffff_ffff) | u64::from(merge(old as u32));
        let set_hi = |old: u64| (old & 0xffff_ffff) | (u64::from(merge((old >> 32) as u32)) << 32);
        let mut events = ChannelEvents::default();
        match offset {
            reg::CHANCTRL => {
                if enables & 0xffff != 0 {
                    let v = merge(u32::from(self.chanctrl)) as u16 & reg::CHANCTRL_WRITABLE;
                    self.chanctrl = v;
                    if v & reg::CHANCTRL_INT_REARM != 0 && self.interrupt_held {
                        self.interrupt_held = false;
                        self.chanctrl &= !reg::CHANCTRL_INT_REARM;
                        events.interrupt = true;
                    }
                }
            }
            reg::CHANCMD => {
                if enables & 0xff != 0 {
                    events = self.command((value & enables) as u8, engine);
                }
                if enables & 0xffff_0000 != 0 {
                    self.dmacount = (merge(u32::from(self.dmacount) << 16) >> 16) as u16;
                    let e = self.doorbell(engine);
                    events.interrupt |= e.interrupt;
                }
            }
            reg::CHAINADDR => {
                self.chainaddr = set_lo(self.chainaddr);
                self.point_at_chain();
            }
            0x14 => {
                self.chainaddr = set_hi(self.chainaddr);
                self.point_at_chain();
            }
            reg::CHANCMP => self.chancmp = set_lo(self.chancmp),
            0x1c => self.chancmp = set_hi(self.chancmp),
            reg::CHANERR => self.chanerr &= !(value & enables),
            reg::CHANERR_MASK => self.chanerr_mask = merge(self.chanerr_mask),
            reg::DCACTRL => self.dcactrl = merge(self.dcactrl),
            _ => log::debug!("ioat: ignoring write to channel register {offset:#x}"),
        }
        if events.interrupt {
            self.counters.interrupts += 1;
        }
        events
    }

    fn point_at_chain(&mut self) {
        self.next_descriptor = self.chainaddr;
        self.completed = 0;
    }

    /// CHANCMD: reset wins over everything else written with it.
    fn command(&mut self, cmd: u8, engine: &mut Engine<'_>) -> ChannelEvents {
        if cmd & reg::CHANCMD_RESET != 0 {
            self.reset();
            return ChannelEvents::default();
        }
        if cmd & reg::CHANCMD_ABORT != 0 {
            self.status = reg::STATUS_HALTED;
            return ChannelEvents::default();
        }
        if cmd & reg::CHANCMD_SUSPEND != 0 {
            if matches!(self.status, reg::STATUS_ACTIVE | reg::STATUS_DONE) {
                self.status = reg::STATUS_SUSPENDED;
            }
            return ChannelEvents::default();
        }
        if cmd & reg::CHANCMD_RESUME != 0 && self.status == reg::STATUS_SUSPENDED {
            self.status = reg::STATUS_DONE;
            return self.doorbell(engine);
        }
        if cmd & (reg::CHANCMD_START | reg::CHANCMD_APPEND) != 0 {
            log::debug!("ioat: CB1 start/append command ignored (CB3 channels use DMACOUNT)");
        }
        ChannelEvents::default()
    }

    /// Channel reset (CHANCMD.RESET): the execution state goes back to power-on — halted, no
    /// errors, counts and addresses cleared. The configuration the driver wrote (CHANCTRL,
    /// CHANCMP, CHAINADDR, the error mask, DCACTRL) is kept: `ioat_reboot_chan()` restarts a
    /// reset channel without writing CHANCTRL again.
    pub fn reset(&mut self) {
        self.status = reg::STATUS_HALTED;
        self.chanerr = 0;
        self.dmacount = 0;
        self.completed = 0;
        self.last_completed = 0;
        self.current = 0;
        self.next_descriptor = self.chainaddr;
        self.interrupt_held = false;
    }

    /// DMACOUNT was written (or the channel resumed): run the chain up to it.
    fn doorbell(&mut self, engine: &mut Engine<'_>) -> ChannelEvents {
        if self.status == reg::STATUS_HALTED && self.chanerr != 0 {
            // Halted on an error: only a reset (or clearing CHANERR) lets it run again.
            return ChannelEvents::default();
        }
        if self.completed == self.dmacount {
            if self.status == reg::STATUS_HALTED {
                // A reset channel with nothing to do stays halted.
                return ChannelEvents::default();
            }
            self.status = reg::STATUS_DONE;
            return ChannelEvents::default();
        }
        self.status = reg::STATUS_ACTIVE;
        let mut events = ChannelEvents::default();
        while self.completed != self.dmacount {
            let address = self.next_descriptor;
            self.current = address;
            let desc = match self.fetch(address, engine.dma) {
                Ok(d) => d,
                Err(err) => {
                    events.interrupt |= self.halt(err, engine.dma).interrupt;
                    return events;
                }
            };
            if let Err(err) = execute(&desc, engine) {
                events.interrupt |= self.halt(err, engine.dma).interrupt;
                return events;
            }
            self.completed = self.completed.wrapping_add(1);
            self.last_completed = address;
            self.next_descriptor = desc.next;
            self.counters.descriptors += 1;
            if !desc.has(ctl::NULL) {
                self.counters.bytes += u64::from(desc.size);
            }
            let more = self.completed != self.dmacount;
            if desc.has(ctl::COMPL_WRITE) {
                let state = if more {
                    reg::STATUS_ACTIVE
                } else {
                    reg::STATUS_DONE
                };
                let status = (address & reg::CHANSTS_ADDRESS_MASK) | state;
                if engine
                    .dma
                    .write(self.chancmp, &status.to_le_bytes())
                    .is_err()
                {
                    events.interrupt |= self.halt(chanerr::COMPLETION_ADDR, engine.dma).interrupt;
                    return events;
                }
            }
            if desc.has(ctl::INT_EN) {
                events.interrupt |= self.completion_interrupt();
            }
        }
        self.status = reg::STATUS_DONE;
        events
    }

    /// Fetches the descriptor at `address` (64-byte aligned; CHAINADDR itself is checked as
    /// CHAIN_ADDR_VALUE, a `next` pointer as NEXT_DESC_ALIGN).
    fn fetch(&self, address: u64, dma: &DmaSpace) -> Result<DmaDescriptor, u32> {
        if !address.is_multiple_of(descriptor::SIZE) {
            return Err(if self.completed == 0 && address == self.chainaddr {
                chanerr::CHAIN_ADDR_VALUE
            } else {
                chanerr::NEXT_DESC_ALIGN
            });
        }
        let mut bytes = [0u8; descriptor::SIZE as usize];
        dma.read(address, &mut bytes).map_err(|e| {
            log::debug!("ioat: descriptor fetch at {address:#x} failed: {e}");
            chanerr::NEXT_ADDR
        })?;
        DmaDescriptor::read_from_bytes(&bytes).map_err(|_| chanerr::NEXT_ADDR)
    }

    fn completion_interrupt(&mut self) -> bool {
        if self.chanctrl & reg::CHANCTRL_INT_REARM != 0 {
            self.chanctrl &= !reg::CHANCTRL_INT_REARM;
            true
        } else {
            self.interrupt_held = true;
            false
        }
    }

    /// Stops the channel on error `bit`.
    fn halt(&mut self, bit: u32, dma: &DmaSpace) -> ChannelEvents {
        self.chanerr |= bit;
        self.status = reg::STATUS_HALTED;
        self.counters.errors += 1;
        log::debug!(
            "ioat: channel halted, CHANERR {:#x} at descriptor {:#x}",
            self.chanerr,
            self.current
        );
        if self.chanctrl & reg::CHANCTRL_ERR_COMPLETION_EN != 0 {
            // The status of a halted channel; a failure here has nothing left to report to.
            let _ = dma.write(self.chancmp, &self.chansts().to_le_bytes());
        }
        ChannelEvents {
            interrupt: self.chanctrl & reg::CHANCTRL_ERR_INT_EN != 0
                && bit & !self.chanerr_mask != 0,
        }
    }
}

/// Executes one descriptor's operation.
fn execute(desc: &DmaDescriptor, engine: &mut Engine<'_>) -> Result<(), u32> {
    let size = u64::from(desc.size);
    if size == 0 || size > 1u64 << engine.xfercap_log {
        return Err(chanerr::LENGTH);
    }
    if desc.has(ctl::NULL) {
        return Ok(());
    }
    if desc.op() != op::COPY {
        return Err(chanerr::CONTROL);
    }
    let buffer = &mut *engine.buffer;
    buffer.resize(size as usize, 0);
    engine.dma.read(desc.src_addr, buffer).map_err(|e| {
        log::debug!("ioat: source read at {:#x} failed: {e}", desc.src_addr);
        match e {
            DmaError::AddressOverflow { .. } => chanerr::SRC_ADDR,
            _ => chanerr::READ_DATA,
        }
    })?;
    engine.dma.write(desc.dst_addr, buffer).map_err(|e| {
        log::debug!(
            "ioat: destination write at {:#x} failed: {e}",
            desc.dst_addr
        );
        match e {
            DmaError::AddressOverflow { .. } => chanerr::DEST_ADDR,
            _ => chanerr::WRITE_DATA,
        }
    })
}
