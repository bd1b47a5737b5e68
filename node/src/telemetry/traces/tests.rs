use super::*;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| map.get(k).cloned()
}

fn flags(endpoint: &str) -> TraceArgs {
    TraceArgs {
        endpoint: Some(endpoint.into()),
        ..TraceArgs::default()
    }
}

#[test]
fn no_endpoint_or_sdk_disabled_means_traces_are_off() {
    assert_eq!(resolve(&TraceArgs::default(), &env_of(&[])), Ok(None));
    let env = env_of(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
        ("OTEL_SDK_DISABLED", "true"),
    ]);
    assert_eq!(resolve(&TraceArgs::default(), &env), Ok(None));
}

#[test]
fn endpoints_follow_the_otel_rules() {
    let grpc = resolve(&flags("http://c:4317/"), &env_of(&[]))
        .unwrap()
        .unwrap();
    assert_eq!(grpc.endpoint, "http://c:4317");
    assert_eq!(grpc.protocol, Protocol::Grpc);
    assert_eq!(
        grpc.sampling,
        Sampling {
            parent_based: true,
            ratio: 1.0
        }
    );

    // The general endpoint gets /v1/traces over HTTP; the traces one is used as written.
    let env = env_of(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ]);
    let http = resolve(&TraceArgs::default(), &env).unwrap().unwrap();
    assert_eq!(http.endpoint, "http://c:4318/v1/traces");
    assert_eq!(http.protocol, Protocol::HttpProtobuf);
    let env = env_of(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://d/custom"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
    ]);
    let http = resolve(&TraceArgs::default(), &env).unwrap().unwrap();
    assert_eq!(http.endpoint, "https://d/custom");

    // The flag beats the environment.
    let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4317")]);
    let flagged = resolve(&flags("http://flag:4317"), &env).unwrap().unwrap();
    assert_eq!(flagged.endpoint, "http://flag:4317");
}

#[test]
fn bad_endpoints_and_settings_are_refused_with_what_to_write() {
    for (endpoint, says) in [
        ("localhost:4317", "no scheme"),
        ("collector", "no scheme"),
        ("ftp://c:4317", "neither http nor https"),
        ("http://", "invalid OTLP endpoint"),
        ("http://c:4317/v1/traces", "no path"),
        ("http://c:0", "port 0"),
        ("http://c:99999", "1 to 65535"),
        ("http://bad host:4317", "invalid OTLP endpoint"),
    ] {
        let err = resolve(&flags(endpoint), &env_of(&[])).expect_err(endpoint);
        assert!(err.contains(says), "{endpoint}: {err}");
        assert!(err.contains("write it like http://"), "{endpoint}: {err}");
    }
    let bad =
        |pairs: &[(&str, &str)]| resolve(&flags("http://c:4317"), &env_of(pairs)).unwrap_err();
    assert!(bad(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).contains("grpc or http/protobuf"));
    assert!(bad(&[("OTEL_TRACES_SAMPLER", "sometimes")]).contains("parentbased_traceidratio"));
    assert!(
        bad(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5")
        ])
        .contains("from 0")
    );
    assert!(
        bad(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "half")
        ])
        .contains("not a number")
    );
    assert!(bad(&[("OTEL_BSP_MAX_QUEUE_SIZE", "-3")]).contains("whole number"));
    let ratio = TraceArgs {
        endpoint: Some("http://c:4317".into()),
        sample_ratio: Some(-0.1),
        ..TraceArgs::default()
    };
    assert!(
        resolve(&ratio, &env_of(&[]))
            .unwrap_err()
            .contains("--trace-sample-ratio")
    );
}

#[test]
fn samplers_come_from_the_environment() {
    let s = |name: &str, arg: Option<&str>| {
        let mut pairs = vec![("OTEL_TRACES_SAMPLER", name)];
        if let Some(a) = arg {
            pairs.push(("OTEL_TRACES_SAMPLER_ARG", a));
        }
        resolve(&flags("http://c:4317"), &env_of(&pairs))
            .unwrap()
            .unwrap()
            .sampling
    };
    assert_eq!(
        s("parentbased_traceidratio", Some("0.25")),
        Sampling {
            parent_based: true,
            ratio: 0.25
        }
    );
    assert_eq!(
        s("always_off", None),
        Sampling {
            parent_based: false,
            ratio: 0.0
        }
    );
    assert_eq!(
        s("traceidratio", None),
        Sampling {
            parent_based: false,
            ratio: 1.0
        }
    );
}

#[test]
fn traceparent_is_parsed_strictly() {
    let good = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let cx = parse_traceparent(good).unwrap();
    assert_eq!(
        cx.trace_id().to_string(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
    assert!(cx.is_sampled());
    assert!(cx.is_remote());
    let unsampled = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
    assert!(!unsampled.unwrap().is_sampled());
    // A later version may carry more after the known fields.
    assert!(
        parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what")
            .is_some()
    );
    for bad in [
        &b""[..],
        b"garbage",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        b"0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01".as_bytes(),
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
    ] {
        assert!(
            parse_traceparent(bad).is_none(),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn traceparent_written_for_upstreams_reads_back() {
    let trace = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    let span = SpanId::from_hex("00f067aa0ba902b7").unwrap();
    let v = traceparent(trace, span);
    assert_eq!(
        v.to_str().unwrap(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    let cx = parse_traceparent(v.as_bytes()).unwrap();
    assert_eq!((cx.trace_id(), cx.span_id()), (trace, span));
}
