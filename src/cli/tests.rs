//! The command line through the real parser.

use super::*;

#[test]
fn durations() {
    let hour = Duration::from_secs(3600);
    let parse = |s| parse_duration_at_most(s, hour);
    assert_eq!(parse("200ms"), Ok(Duration::from_millis(200)));
    assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
    assert_eq!(parse("1h"), Ok(hour));
    assert!(parse("0s").is_err());
    assert!(parse("5 parsecs").is_err());
    assert!(parse("").is_err());
    let err = parse("61m").unwrap_err();
    assert!(err.contains("maximum of 1h"), "{err}");
}

/// Every duration flag, through the real parser: absurd values are refused with the limit
/// (they used to panic, or wrap around to a small value), and the limit itself is accepted.
#[test]
fn duration_flags_are_bounded() {
    let flags = [
        ("--poll-interval", "1h"),
        ("--sync-debounce", "1h"),
        ("--sync-max-delay", "1h"),
        ("--resync-period", "24h"),
        ("--xtables-wait", "1h"),
    ];
    let parse = |flag: &str, value: &str| {
        Cli::try_parse_from(["k", "run", "--node-name", "n", flag, value])
    };
    for (flag, max) in flags {
        let Command::Run {
            poll_interval,
            sync_debounce,
            sync_max_delay,
            resync_period,
            xtables_wait,
            ..
        } = parse(flag, max).unwrap().command
        else {
            panic!("not run");
        };
        let got = match flag {
            "--poll-interval" => poll_interval,
            "--sync-debounce" => sync_debounce,
            "--sync-max-delay" => sync_max_delay,
            "--resync-period" => resync_period,
            _ => xtables_wait,
        };
        assert_eq!(
            Ok(got),
            parse_duration_at_most(max, Duration::MAX),
            "{flag}"
        );
        for absurd in [
            "9223372036854775808s",
            "18446744073709551615s",
            "18446744073709551616ms",
            "307445734561825861m",
            "5124095576030431h",
            "25h",
            "90000s",
        ] {
            let err = parse(flag, absurd).unwrap_err().to_string();
            assert!(
                err.contains(flag) && err.contains(&format!("maximum of {max}")),
                "{flag} {absurd}: {err}"
            );
        }
    }
}

#[test]
fn cli_is_well_formed() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

fn config(args: &[&str]) -> Result<Config> {
    let argv = ["k"].iter().chain(args);
    Cli::try_parse_from(argv).unwrap().into_config()
}

#[test]
fn run_flags_become_a_plain_config() {
    let Config::Run(run) = config(&[
        "run",
        "--node-name",
        "n1",
        "--manifests",
        "/m",
        "--backend",
        "nft",
        "--metrics-bind-address",
        "127.0.0.1:9000",
        "--sync-debounce",
        "250ms",
    ])
    .unwrap() else {
        panic!("not run");
    };
    assert_eq!(
        run.source,
        SourceConfig::Manifests {
            dir: "/m".into(),
            max_file_bytes: manifests::DEFAULT_MAX_FILE_BYTES,
            poll_interval: Duration::from_millis(200),
        }
    );
    assert_eq!(run.node_name, "n1");
    assert_eq!(run.backend, BackendChoice::Nft);
    assert_eq!(run.metrics_bind, Some("127.0.0.1:9000".parse().unwrap()));
    assert_eq!(run.timing.debounce, Duration::from_millis(250));
    assert!(!run.once);

    let Config::Run(run) =
        config(&["run", "--node-name", "n1", "--metrics-bind-address", "off"]).unwrap()
    else {
        panic!("not run");
    };
    assert_eq!(run.source, SourceConfig::Kube { kubeconfig: None });
    assert_eq!(run.metrics_bind, None);
}

#[test]
fn unusable_run_flags_are_refused_with_the_reason() {
    let err = config(&["run", "--node-name", ""]).unwrap_err().to_string();
    assert!(err.contains("no node name"), "{err}");
    let err = config(&[
        "run",
        "--node-name",
        "n",
        "--metrics-bind-address",
        "localhost",
    ])
    .unwrap_err()
    .to_string();
    assert!(err.contains("--metrics-bind-address"), "{err}");
}

#[test]
fn manifests_and_kubeconfig_exclude_each_other() {
    assert!(Cli::try_parse_from(["k", "run", "--manifests", "d", "--kubeconfig", "k"]).is_err());
    assert!(Cli::try_parse_from(["k", "run", "--node-name", "n"]).is_ok());
}

#[test]
fn explain_flags() {
    let config = |args: &[&str]| {
        let mut all = vec!["k", "explain", "--manifests", "m"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|cli| cli.into_config().unwrap())
    };
    let Ok(Config::Explain { query, json, .. }) = config(&[
        "--from",
        "x/a",
        "--to",
        "10.0.0.9",
        "--port",
        "53",
        "--protocol",
        "udp",
        "--family",
        "6",
        "--output",
        "json",
    ]) else {
        panic!("explain expected");
    };
    assert!(json);
    assert_eq!(query.protocol, Protocol::Udp);
    assert_eq!(query.family, Some(Family::V6));
    assert_eq!(query.port, 53);
    assert!(matches!(query.to, Endpoint::Address(_)));
    let Ok(Config::Explain { query, json, .. }) =
        config(&["--from", "x/a", "--to", "y/b", "--port", "80"])
    else {
        panic!("explain expected");
    };
    assert!(!json);
    assert_eq!((query.protocol, query.family), (Protocol::Tcp, None));
    assert!(config(&["--from", "x", "--to", "y/b", "--port", "80"]).is_err());
    assert!(config(&["--from", "x/a", "--to", "y/b", "--port", "0"]).is_err());
    assert!(
        config(&[
            "--from", "x/a", "--to", "y/b", "--port", "80", "--family", "5"
        ])
        .is_err()
    );
    assert!(
        Cli::try_parse_from([
            "k",
            "explain",
            "--manifests",
            "m",
            "--kubeconfig",
            "c",
            "--from",
            "x/a",
            "--to",
            "y/b",
            "--port",
            "80"
        ])
        .is_err()
    );
}

/// The denied-packet log's flags: off by default; on, with group and rate, into the enforcement
/// options; absurd rates refused; the counters' interval can be turned off.
#[test]
fn log_denied_flags() {
    let run = |extra: &[&str]| {
        let mut args = vec!["k", "run", "--node-name", "n"];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args)
            .map_err(|e| e.to_string())?
            .into_config()
            .map_err(|e| e.to_string())?
        {
            Config::Run(run) => Ok::<_, String>(run),
            other => panic!("{other:?}"),
        }
    };
    let default = run(&[]).unwrap();
    assert_eq!(default.enforcement.log_denied, None);
    assert_eq!(
        default.policy_counters_interval,
        Some(Duration::from_secs(30))
    );
    let on = run(&[
        "--log-denied",
        "--nflog-group",
        "7",
        "--log-denied-rate",
        "2/s,burst=4",
        "--policy-counters-interval",
        "off",
    ])
    .unwrap();
    let log = on.enforcement.log_denied.unwrap();
    assert_eq!(log.group, 7);
    assert_eq!((log.rate.per_second, log.rate.burst), (2, 4));
    assert_eq!(on.policy_counters_interval, None);
    let defaults = run(&["--log-denied"])
        .unwrap()
        .enforcement
        .log_denied
        .unwrap();
    assert_eq!(defaults.group, 100);
    assert_eq!((defaults.rate.per_second, defaults.rate.burst), (5, 10));
    for bad in [
        &["--log-denied-rate", "0/s"][..],
        &["--log-denied-rate", "20000/s"],
        &["--nflog-group", "70000"],
        &["--policy-counters-interval", "2h"],
    ] {
        assert!(run(bad).is_err(), "{bad:?}");
    }
    let json = Cli::try_parse_from(["k", "--log-format", "json", "version"]).unwrap();
    assert_eq!(json.log_format, LogFormat::Json);
}
