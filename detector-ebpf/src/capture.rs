//! Handing the first client bytes of a flow to userspace (the ClientHello, for JA4), once per flow.

use aya_ebpf::{helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use core::mem::size_of;
use detector_common::{
    EventKind, FlowState, PayloadEvent, Scratch,
    flow::{CAPTURE_BYTES, CAPTURE_CHUNK, CAPTURE_MAX_EVENTS, flow_flag},
};

use crate::{
    account::{count_event, fill_header, wakeup_flag},
    clock::Clock,
    maps::EVENTS,
};

/// Sends the segment described by `scratch.payload_*` as a [`PayloadEvent`] and spends the flow's capture
/// budget. `hello_status`, `hello_key` and `action` are what `aqd_hello` found (zeros from `aqd_tcp`).
#[inline(always)]
pub fn emit_payload(
    ctx: &XdpContext,
    scratch: &Scratch,
    flow: &mut FlowState,
    hello_status: u8,
    hello_key: u64,
    action: u8,
    clock: &mut Clock,
) {
    flow.capture_events = flow.capture_events.saturating_add(1);
    let segment_len = scratch.payload_len as u32;
    if flow.capture_events >= CAPTURE_MAX_EVENTS || scratch.stream_offset + segment_len >= CAPTURE_BYTES {
        flow.flags |= flow_flag::CAPTURE_DONE;
    }
    let sent = match EVENTS.reserve::<PayloadEvent>(0) {
        Some(mut slot) => {
            let event = slot.as_mut_ptr();
            let len = if segment_len as usize > CAPTURE_CHUNK {
                CAPTURE_CHUNK as u32
            } else {
                segment_len
            };
            // 1..=CAPTURE_CHUNK in a form the verifier follows (see `options` in tcp.rs); used when len ≥ 1.
            let copy_len = ((core::hint::black_box(len).wrapping_sub(1)) & (CAPTURE_CHUNK as u32 - 1)) + 1;
            // SAFETY: `event` is the reserved, exclusively owned ring-buffer slot of a PayloadEvent's size; the
            // copy writes `len` ≤ CAPTURE_CHUNK bytes into its `data` array.
            unsafe {
                fill_header(
                    &raw mut (*event).header,
                    ctx,
                    EventKind::Payload,
                    size_of::<PayloadEvent>(),
                    clock,
                );
                (*event).flow = scratch.flow;
                (*event).stream_offset = scratch.stream_offset;
                (*event).segment_len = scratch.payload_len;
                (*event).hello_key = hello_key;
                (*event).hello_status = hello_status;
                (*event).action = action;
                (*event).flow_flags = flow.flags;
                (*event)._pad = [0; 5];
                let mut copied = 0u16;
                if len > 0 {
                    let rc = bpf_xdp_load_bytes(
                        ctx.ctx,
                        scratch.payload_offset as u32,
                        (&raw mut (*event).data).cast(),
                        copy_len,
                    );
                    if rc == 0 {
                        copied = copy_len as u16;
                    }
                }
                (*event).len = copied;
            }
            slot.submit(wakeup_flag());
            true
        }
        None => false,
    };
    count_event(EventKind::Payload, sent, false);
}
