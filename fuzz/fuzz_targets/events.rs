//! Event decoding, from the bytes a topic or the event table could hold: no panic; a decoded
//! partnership event survives the round trip through its wire form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tandem_codec::{event_from_proto, event_to_proto};
use tandem_domain::ids::PartnershipId;
use tandem_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    if let Ok(wire) = pb::PartnershipEvent::decode(data) {
        if let Ok(event) = event_from_proto(&wire) {
            let partnership = PartnershipId::generate();
            let again = event_from_proto(&event_to_proto(&partnership, &event))
                .expect("an event written by the codec decodes");
            assert_eq!(again, event, "event changed on the round trip");
        }
    }
    let _ = pb::EventEnvelope::decode(data);
    let _ = pb::LedgerEvent::decode(data);
});
