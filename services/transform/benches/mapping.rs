//! What a transform costs per message: the `commcare-to-dhis2-event` example's mapping (a
//! CommCare form → a DHIS2 tracker event, with a filter, two lookup tables and a derived UID)
//! on the example's sample form, from body bytes to request body bytes, as the transformer
//! runs it.
//!
//! `cargo bench -p hiway-transform --bench mapping`; figures in docs/benchmarks.md.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use hiway_proto::RouteName;
use hiway_transform::{Applied, Meta, Transforms};

// The services' allocator, so that the figures are the transformer's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/examples/commcare-to-dhis2-event")
}

fn mapping(c: &mut Criterion) {
    // The example's DHIS2 token is a reference to the variable DHIS2_PAT, which the
    // configuration check resolves; the programs do not need it, so a copy of the example
    // gives an inline token instead (a string reference replaces the table of a lower layer).
    let dir = tempfile::tempdir().expect("temp dir");
    for sub in ["", "lookups", "transforms", "samples"] {
        std::fs::create_dir_all(dir.path().join(sub)).expect("dir");
        for entry in std::fs::read_dir(example().join(sub)).expect("example dir") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                let to = dir.path().join(sub).join(path.file_name().expect("name"));
                std::fs::copy(&path, to).expect("copy");
            }
        }
    }
    std::fs::write(
        dir.path().join("zz-bench.toml"),
        "[destinations.dhis2-tracker]\nauth = { type = \"api-token\", token = \"value:d2pat_bench\" }\n",
    )
    .expect("write override");
    let config = hiway_config::load(Some(dir.path())).expect("the example configuration loads");
    let transforms = Transforms::compile(&config).expect("the example's programs compile");
    let route = RouteName::parse("anc-visits-to-dhis2").expect("route name");
    let body = std::fs::read(example().join("samples/anc-visit.json")).expect("sample form");
    let meta = Meta {
        message_id: "0193a0c4-0000-7000-8000-000000000001",
        channel: "commcare-forms",
        client: "commcare",
        received_at: "2026-11-22T10:00:00Z",
    };

    // The mapping does what the example says before it is timed.
    let input = hiway_transform::parse(&body).expect("sample is JSON");
    match transforms
        .apply(&route, &input, &meta)
        .expect("mapping runs")
    {
        Applied::Outputs(outputs) => {
            let event = String::from_utf8(outputs[0].body.clone()).expect("utf-8");
            assert!(event.contains(r#""orgUnit":"DiszpKrYNg8""#), "{event}");
        }
        other => panic!("expected one event, got {other:?}"),
    }

    c.bench_function(
        "commcare form -> dhis2 tracker event (parse + filter + transform + serialize)",
        |b| {
            b.iter(|| {
                let input = hiway_transform::parse(black_box(&body)).expect("json");
                black_box(transforms.apply(&route, &input, &meta).expect("mapping"))
            })
        },
    );
    c.bench_function("parse the 2 KB form only", |b| {
        b.iter(|| black_box(hiway_transform::parse(black_box(&body)).expect("json")))
    });
}

criterion_group!(benches, mapping);
criterion_main!(benches);
