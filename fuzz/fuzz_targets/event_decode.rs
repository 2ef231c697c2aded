//! The ring-buffer record decoder: any bytes give an event or a `DecodeError`, never a panic, and the result
//! agrees with the header the bytes carry:
//! - the error says exactly what is wrong (short header ⇔ fewer bytes than a header; unknown kind ⇔ a kind
//!   `EventKind::from_u16` refuses; short record ⇔ fewer bytes than the kind's layout, and it names that size);
//! - an event has the header's kind and time, and decoding only the kind's own layout (trailing bytes cut)
//!   gives the same event, so a reader never depends on what follows a record;
//! - a payload event carries at most its layout's capture bytes, exactly the header's `len` when that fits,
//!   and they are the record's bytes;
//! - a decoded flow converts back to the kernel's key and to the same flow again.

#![no_main]

use detector_common::{
    ConnEvent, DropEvent, EventHeader, EventKind, FlowEvent, PayloadEvent, flow::CAPTURE_CHUNK,
};
use detector_user::events::{DecodeError, Event, Flow, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let header_len = size_of::<EventHeader>();
    let result = decode(data);
    if data.len() < header_len {
        assert_eq!(result, Err(DecodeError::ShortHeader { len: data.len() }));
        return;
    }
    let raw_kind = u16::from_ne_bytes([data[0], data[1]]);
    let time_ns = u64::from_ne_bytes(data[8..16].try_into().expect("8 bytes"));
    let Some(kind) = EventKind::from_u16(raw_kind) else {
        assert_eq!(result, Err(DecodeError::UnknownKind { kind: raw_kind }));
        return;
    };
    let layout = match kind {
        EventKind::Conn => size_of::<ConnEvent>(),
        EventKind::Drop => size_of::<DropEvent>(),
        EventKind::Payload => size_of::<PayloadEvent>(),
        EventKind::Request | EventKind::FlowEnd | EventKind::Established => size_of::<FlowEvent>(),
    };
    let event = match result {
        Err(e) => {
            assert!(
                data.len() < layout,
                "{} bytes of {layout} refused: {e}",
                data.len()
            );
            assert_eq!(
                e,
                DecodeError::ShortRecord {
                    kind: kind.name(),
                    len: data.len(),
                    expected: layout
                }
            );
            return;
        }
        Ok(event) => event,
    };
    assert!(data.len() >= layout);
    assert_eq!(event.kind(), kind);
    assert_eq!(event.time_ns(), time_ns);
    assert_eq!(
        decode(&data[..layout]).as_ref(),
        Ok(&event),
        "trailing bytes changed the event"
    );
    let flow = match &event {
        Event::Conn { flow, .. } | Event::Drop { flow, .. } => *flow,
        Event::Payload {
            flow, data: captured, ..
        } => {
            let offset = std::mem::offset_of!(PayloadEvent, data);
            let declared = usize::from(u16::from_ne_bytes(
                data[std::mem::offset_of!(PayloadEvent, len)..][..2]
                    .try_into()
                    .expect("2 bytes"),
            ));
            assert_eq!(captured.len(), declared.min(CAPTURE_CHUNK));
            assert_eq!(captured[..], data[offset..offset + captured.len()]);
            *flow
        }
        Event::Established(a) | Event::Request(a) | Event::FlowEnd(a) => a.flow,
    };
    assert_eq!(Flow::from(&flow.tuple()), flow, "flow → kernel key → flow");
    std::hint::black_box(format!("{event:?}"));
});
