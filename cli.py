"""The `edgeops` command line: thin click commands, each a call into a library function.

Heavy modules are imported inside the command that needs them, so `edgeops agent ...` on a device
never loads the compiler. Errors caused by input (EdgeopsError) print one line and exit 1.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click

from edgeops import __version__
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import STATES

log = logging.getLogger("edgeops")


def _read_fleet(fleet_at: str, remote, local):
    """A read from the fleet's HTTP API (`remote(url)`, --fleet URL) or its registry (`local(db)`, --fleet DIR)."""
    from edgeops.fleet import client

    if client.is_url(fleet_at):
        return remote(fleet_at)
    from edgeops.fleet.home import FleetHome
    from edgeops.fleet.registry import open_db

    return local(open_db(FleetHome.open(fleet_at).db_path))


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


class _Group(click.Group):
    """Every subcommand's errors become click's one-line `Error: ...` and exit status 1.

    EdgeopsError carries a message written for users; anything else is a bug, shown as one line too
    (the traceback goes to the debug log), because a traceback is not an error message.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeopsError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            log.debug("internal error", exc_info=True)
            raise click.ClickException(
                f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                "(run with -vv for the traceback, and please report it)"
            ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeops")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Compile ONNX models for edge hardware and ship them to device fleets.

    \b
    Examples:
      edgeops profiles list
      edgeops build model.onnx --profile rpi4 --calib calib.npz --eval eval.npz
      edgeops inspect model-1.0.0-rpi4.edgeops
      edgeops demo
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.group()
def profiles() -> None:
    """Hardware profiles: what a device runs and what a build must meet.

    \b
    Examples:
      edgeops profiles list
      edgeops profiles show rpi4 --json
      edgeops profiles show ./my-board.toml
    """


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles_list(as_json: bool) -> None:
    """List the shipped profiles.

    \b
    Example:
      edgeops profiles list --json
    """
    from edgeops.protocol.profiles import list_profiles

    found = list_profiles()
    if as_json:
        _echo_json([p.to_dict() for p in found])
        return
    rows = [(p.name, p.arch, f"{p.runtime.name} {p.runtime.version}", p.precision, p.description) for p in found]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles_show(name: str, as_json: bool) -> None:
    """Show one profile, by name or .toml path.

    \b
    Examples:
      edgeops profiles show rpi-zero2w
      edgeops profiles show ./boards/my-gateway.toml --json
    """
    from edgeops.protocol.profiles import load_profile

    profile = load_profile(name)
    data = profile.to_dict()
    if as_json:
        _echo_json(data)
        return
    for key, value in data.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for sub, item in value.items():
                click.echo(f"  {sub}: {item}")
        else:
            click.echo(f"{key}: {value}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "-p", required=True, help="Profile name (see `edgeops profiles list`) or .toml path.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration data (.npz keyed by input name).")
@click.option("--eval", "eval_", type=click.Path(path_type=Path), help="Eval data (.npz; may hold `labels`).")
@click.option("--max-accuracy-drop", default=0.01, show_default=True, type=float, help="Largest quality drop accepted (0.01 = 1 point).")
@click.option("--metric", metavar="NAME|FILE.py:FUNCTION",
              help="The task metric: a built-in one (accuracy, top1, detection, ctc, segmentation, cosine, "
                   "worst-channel) or your own function, called as FUNCTION(fp32, candidate, data). "
                   "[default: chosen by what the outputs are]")
@click.option("--search-time", metavar="DURATION", default="20m", show_default=True,
              help="Time for the search, e.g. 5m, 1h; then the best so far is kept.")
@click.option("--engine", type=click.Choice(["edgeops", "inc"]), default="edgeops", show_default=True,
              help="Who searches for the int8 model: edgeops' built-in search, or Intel Neural Compressor's "
                   "accuracy-aware tuning (onnx-neural-compressor, in its own venv: set EDGEOPS_INC_PYTHON).")
@click.option("--name", help="Model name (default: the file's stem).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Model version.")
@click.option("-o", "--output", "outdir", default=".", show_default=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object (progress goes to stderr).")
@click.option("--max-memory", metavar="SIZE", help="Memory the build process may allocate, e.g. 8GiB. [default: 3/4 of this machine's RAM]")
@click.option("--max-cpu-time", metavar="DURATION", help="CPU time the build process may use, e.g. 30m, 2h. [default: 8h]")
def build(model, profile, calib, eval_, max_accuracy_drop, metric, search_time, engine, name, version, outdir, as_json,
          max_memory, max_cpu_time) -> None:
    """Compile MODEL for a hardware profile into a signed-ready bundle.

    Prunes and quantizes, measures every candidate on the eval data, and keeps
    the smallest, fastest one within --max-accuracy-drop and the profile's budgets.
    The model is untrusted input: the build runs in a child process under
    --max-memory and --max-cpu-time, and fails with one line when it exceeds them.

    \b
    Examples:
      edgeops build model.onnx --profile rpi4 --calib calib.npz --eval eval.npz
      edgeops build model.onnx -p x86-vnni --calib calib.npz --max-accuracy-drop 0.005 -o dist/
      edgeops build model.onnx -p rpi-zero2w --calib calib.npz --json > report.json
      edgeops build yolo.onnx -p x86-vnni --calib calib.npz --eval eval.npz --metric docs/metrics/yolo_f1.py:detection_f1
      edgeops build untrusted.onnx -p rpi4 --calib calib.npz --max-memory 4GiB --max-cpu-time 30m
      EDGEOPS_INC_PYTHON=~/inc-venv/bin/python edgeops build model.onnx -p rpi4 --calib calib.npz --eval eval.npz --engine inc
    """
    from rich.console import Console

    from edgeops.compiler.report import render, render_failure
    from edgeops.compiler.sandbox import Limits, parse_seconds, run_build
    from edgeops.protocol.errors import BuildFailed

    limits = Limits.from_options(max_memory, max_cpu_time)
    err = Console(stderr=True)
    # The fields of edgeops.compiler.build.BuildRequest: this process never imports the compiler itself.
    request = {"model": model, "profile": profile, "calib": calib, "eval": eval_, "max_drop": max_accuracy_drop,
               "name": name, "version": version, "outdir": outdir, "metric": metric, "engine": engine,
               "search_time": parse_seconds(search_time, "--search-time")}
    try:
        with err.status("building") as status:
            report = run_build(request, limits, progress=lambda message: status.update(message))
    except BuildFailed as exc:  # the candidates tried are what a user needs to decide what to change
        if as_json:
            _echo_json(exc.report)
        else:
            render_failure(exc.report, _stdout_console())
        raise
    if as_json:
        _echo_json(report)
    else:
        render(report, _stdout_console())


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Verify a bundle and print its manifest.

    \b
    Examples:
      edgeops inspect dist/digits-1.0.0-rpi4.edgeops
      edgeops inspect dist/digits-1.0.0-rpi4.edgeops --json | jq .metrics
    """
    from edgeops.protocol.bundle import read_bundle

    manifest = read_bundle(bundle).manifest
    if as_json:
        _echo_json(manifest)
        return
    q = manifest["metrics"]["quality"]
    click.echo(f"{manifest['name']} {manifest['version']} for profile {manifest['profile']} "
               f"({manifest['runtime']['name']} >= {manifest['runtime']['min_version']})")
    click.echo(f"model: {manifest['model']['file']} {manifest['model']['size']} B, opset {manifest['model']['opset']}, "
               f"sha256 {manifest['model']['sha256']}")
    for role in ("inputs", "outputs"):
        for spec in manifest[role]:
            click.echo(f"{role[:-1]}: {spec['name']} {spec['dtype']} {spec['shape']}")
    click.echo(f"quality ({q['metric']}): fp32 {q['fp32']:.4f}, compiled {q['compiled']:.4f}, drop {q['drop']:+.4f}")
    click.echo(f"compiled as: {manifest['compiler']['chosen']}")


@cli.command()
@click.option("-o", "--output", "workdir", default="demo-out", show_default=True, type=click.Path(path_type=Path), help="Working folder.")
@click.option("--keep-running", is_flag=True, help="Keep the fleet, its dashboard and the agents running until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print the builds and the final status as JSON.")
def demo(workdir: Path, keep_running: bool, as_json: bool) -> None:
    """The whole product in a few minutes, on its embedded defaults, with nothing to set up.

    Trains a real model and builds it for two hardware profiles, side by side; starts the embedded
    broker, a fleet with its dashboard, and a dozen agents as real processes, with apps calling
    their inference APIs; rolls v1 out in stages gated by health; rolls out a v2 that breaks the
    apps, which fails its health gate on the canary and is rolled back automatically; dims one
    device's camera and shows the fleet flag the model for retraining; prints the status and the
    dashboard's URL.

    \b
    Examples:
      edgeops demo -o /tmp/demo
      edgeops demo --keep-running      # then open the dashboard URL it prints
    """
    from rich.console import Console

    from edgeops.demo import run_demo

    results = run_demo(workdir, Console(stderr=True) if as_json else _stdout_console(), keep_running)
    if as_json:
        _echo_json(results)


@cli.group()
def fleet() -> None:
    """The fleet server: registry, signing, delivery over MQTT.

    \b
    Examples:
      edgeops fleet init ./fleet
      edgeops fleet serve ./fleet
      edgeops fleet serve ./fleet --broker mqtts://broker.example.net:8883
      edgeops fleet mosquitto-config ./fleet -o ./broker
      edgeops fleet certs ./fleet --broker-host broker.example.net
    """


@fleet.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--broker", default="mqtts://127.0.0.1:8883", show_default=True,
              help="Broker URL the fleet and its devices use (mqtts://; plain mqtt:// only on loopback).")
@click.option("--broker-host", "broker_hosts", multiple=True, metavar="NAME",
              help="Another host name or address devices reach the broker by (repeatable); its certificate covers them.")
@click.option("--api-host", "api_hosts", multiple=True, metavar="NAME",
              help="Another host name or address operators reach the HTTP API by (repeatable); its certificate "
                   "covers them, with loopback and the broker's names.")
def fleet_init(directory: Path, broker: str, broker_hosts: tuple[str, ...], api_hosts: tuple[str, ...]) -> None:
    """Create a fleet: registry database, signing keys, TUF metadata, and the fleet's certificate
    authority with the broker's certificate and the HTTP API's (pki/api.pem).

    \b
    Examples:
      edgeops fleet init ./fleet
      edgeops fleet init ./fleet --broker mqtts://broker.lan:8883 --broker-host 10.0.0.5 --api-host fleet.lan
    """
    from edgeops.fleet.home import init_fleet

    init_fleet(directory, broker, broker_hosts=list(broker_hosts), api_hosts=list(api_hosts))
    click.echo(f"fleet created in {directory}. Next steps:")
    click.echo(f"  edgeops fleet serve {directory}")
    click.echo(f"  edgeops device enroll pi-001 --profile rpi4 --label site=lab --fleet {directory} -o ./pi-001")
    click.echo(f"  edgeops push model-1.0.0-rpi4.edgeops --fleet {directory}")
    click.echo(f"Keep {directory}/repo/keys/root.pem offline once devices are enrolled.")


@fleet.command("serve")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--broker", help="A broker you run (mqtts://HOST:PORT, configured with `fleet mosquitto-config`); "
              "default: start a private Mosquitto with the fleet's TLS settings.")
@click.option("--http", "http", default="127.0.0.1:8420", show_default=True,
              help="HOST:PORT of the operators' HTTP JSON API (token: api_token in DIRECTORY/fleet.json).")
@click.option("--on-drift", metavar="CMD", help="Shell command run once for each model version flagged "
              "'retraining recommended', with EDGEOPS_MODEL, EDGEOPS_VERSION and EDGEOPS_FLEET set.")
@click.option("--share", metavar="GROUP", help="Take telemetry through the MQTT shared subscription of GROUP, "
              "with the ingest workers of `edgeops fleet ingest --share GROUP`.")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="Serve the HTTP API over HTTPS with this "
              "certificate (PEM) instead of the fleet's own (pki/api.pem, from the fleet CA).")
@click.option("--tls-key", type=click.Path(path_type=Path), help="The private key (PEM) of --tls-cert.")
@click.option("--plain-http", is_flag=True, help="Serve the HTTP API without TLS; only on a loopback --http.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Another name clients reach the API by, accepted in the Host header (repeatable); "
                   "loopback names and the --http address always are.")
@click.option("--open-reads/--closed-reads", default=None,
              help="Whether reads need no token. [default: open on loopback, closed otherwise]")
def fleet_serve(directory: Path, broker: str | None, http: str, on_drift: str | None, share: str | None,
                tls_cert: Path | None, tls_key: Path | None, plain_http: bool, allowed_hosts: tuple[str, ...],
                open_reads: bool | None) -> None:
    """Deliver releases to devices and collect their state, and serve the operators' HTTP API, until interrupted.

    The API (OpenAPI description at /v1/openapi.json) backs `push`, `status` and the rest with
    --fleet URL, and serves the dashboard at /. It speaks HTTPS with the fleet's certificate
    (pki/api.pem; clients pass --ca DIR/pki/ca.pem), or --tls-cert/--tls-key; plain HTTP only with
    --plain-http on loopback. Operators sign in with tokens from `edgeops operator add`. Add names
    the API is reached by with `edgeops fleet certs DIR --api-host NAME`.

    \b
    Examples:
      edgeops fleet serve ./fleet
      edgeops fleet serve ./fleet --broker mqtts://broker.lan:8883
      edgeops fleet serve ./fleet --on-drift 'edgeops drift export --fleet ./fleet --model "$EDGEOPS_MODEL" -o ./retrain'
      edgeops fleet serve ./fleet --broker mqtts://broker.lan:8883 --share ingest
      edgeops fleet serve ./fleet --http 0.0.0.0:8420 --allowed-host fleet.lan
    """
    from edgeops.fleet.server import serve

    serve(directory, broker, http, on_drift, share, {"tls_cert": tls_cert, "tls_key": tls_key, "plain_http": plain_http,
                                                     "allowed_hosts": allowed_hosts, "open_reads": open_reads})


@fleet.command("ingest")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--broker", help="Broker (mqtts://HOST:PORT); default: the fleet's.")
@click.option("--share", metavar="GROUP", required=True,
              help="Shared-subscription group, the one given to `edgeops fleet serve --share`.")
@click.option("--worker", type=click.IntRange(1), default=1, show_default=True,
              help="This worker's number: its certificate (pki/ingest-N); each running worker needs its own.")
def fleet_ingest(directory: Path, broker: str | None, share: str, worker: int) -> None:
    """Run an extra telemetry ingest worker, writing the fleet's registry, until interrupted.

    The broker hands each telemetry message to one member of GROUP; run `fleet serve --share GROUP`
    too, and give the broker the files of `edgeops fleet mosquitto-config --ingest-workers N`, which
    let workers 1 to N in.

    \b
    Examples:
      edgeops fleet mosquitto-config ./fleet -o ./broker --ingest-workers 2
      edgeops fleet serve ./fleet --broker mqtts://broker.lan:8883 --share ingest
      edgeops fleet ingest ./fleet --share ingest --worker 1
      edgeops fleet ingest ./fleet --share ingest --worker 2
    """
    from edgeops.fleet.ingest import run

    run(directory, broker, worker, share)


@fleet.command("mosquitto-config")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder to write the files into.")
@click.option("--bind", help="Address the listener binds (default: every interface).")
@click.option("--ingest-workers", type=click.IntRange(0), default=0, show_default=True,
              help="Certificates for this many `edgeops fleet ingest` workers (numbers 1 to N).")
def fleet_mosquitto_config(directory: Path, out: Path, bind: str | None, ingest_workers: int) -> None:
    """Write Mosquitto ACL and config files: mutual TLS with the fleet CA, each device confined to its own topics.

    Writes OUT/acl and OUT/mosquitto.conf: one TLS listener on the fleet's broker port that requires
    a client certificate from the fleet CA, checks the fleet's CRL, and takes the device id from the
    certificate. There is no plaintext listener. New devices need no reload; after `edgeops device
    revoke`, run it again and reload Mosquitto (SIGHUP; restart it to close the device's open
    connection). The broker reads the fleet's pki/ folder (broker.key is mode 0600): run it as the
    fleet's user or hand the files over. `fleet serve` without --broker does all of this itself.

    \b
    Examples:
      edgeops fleet mosquitto-config ./fleet -o ./broker
      mosquitto -c ./broker/mosquitto.conf
      edgeops fleet mosquitto-config ./fleet -o /etc/mosquitto/edgeops --bind 10.0.0.5
      edgeops fleet mosquitto-config ./fleet -o ./broker --ingest-workers 2
    """
    from edgeops.fleet.home import FleetHome
    from edgeops.fleet.mosquitto import write_config

    files = write_config(FleetHome.open(directory), out, bind, ingest_workers)
    click.echo(f"wrote {files['acl']} and {files['conf']}; start the broker with:")
    click.echo(f"  mosquitto -c {files['conf']}")


@fleet.command("certs")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--broker-host", "broker_hosts", multiple=True, metavar="NAME",
              help="A host name or address devices reach the broker by, added to those it has (repeatable).")
@click.option("--api-host", "api_hosts", multiple=True, metavar="NAME",
              help="A host name or address operators reach the HTTP API by, added to those it has (repeatable).")
def fleet_certs(directory: Path, broker_hosts: tuple[str, ...], api_hosts: tuple[str, ...]) -> None:
    """Issue the broker's and the HTTP API's TLS certificates again, for their names plus new ones;
    then restart `fleet serve` (and a broker you run) to use them.

    Without options both are issued again for the names they have (before they expire). Clients
    check them against the fleet CA (DIR/pki/ca.pem: `--ca` or EDGEOPS_CA for the API).

    \b
    Examples:
      edgeops fleet certs ./fleet --broker-host broker.lan --broker-host 10.0.0.5
      edgeops fleet certs ./fleet --api-host fleet.lan
      edgeops fleet certs ./fleet
    """
    from edgeops.fleet.home import FleetHome, issue_api_certificate, issue_broker_certificate

    home = FleetHome.open(directory)
    both = not broker_hosts and not api_hosts
    if broker_hosts or both:
        click.echo(f"broker certificate issued for {', '.join(issue_broker_certificate(home, list(broker_hosts)))}")
    if api_hosts or both:
        click.echo(f"API certificate issued for {', '.join(issue_api_certificate(home, list(api_hosts)))}")
    click.echo("restart `fleet serve` (and a broker you run) to use them")


@cli.group()
def keys() -> None:
    """The fleet's signing keys: keep root and targets offline, rotate them.

    \b
    Examples:
      edgeops keys export root --fleet ./fleet -o /media/usb/root.pem --remove
      edgeops keys rotate targets --fleet ./fleet --root-key /media/usb/root.pem
    """


@keys.command("export")
@click.argument("role", type=click.Choice(["root", "targets"]))
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")
@click.option("-o", "--output", "dest", required=True, type=click.Path(path_type=Path), help="File to write the key to.")
@click.option("--remove", is_flag=True, help="Delete the fleet's copy afterwards (the key is then offline only).")
def keys_export(role: str, fleet_dir: Path, dest: Path, remove: bool) -> None:
    """Copy the root or targets key out of the fleet, e.g. to offline storage.

    \b
    Example:
      edgeops keys export root --fleet ./fleet -o /media/usb/root.pem --remove
    """
    from edgeops.fleet import trust
    from edgeops.fleet.home import FleetHome

    path = trust.export_key(FleetHome.open(fleet_dir).repo, role, dest, remove)
    click.echo(f"{role} key written to {path}" + ("; the fleet no longer holds it" if remove else ""))


@keys.command("rotate")
@click.argument("role", type=click.Choice(["root", "targets"]))
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")
@click.option("--root-key", type=click.Path(path_type=Path), help="The current root key, when kept offline.")
def keys_rotate(role: str, fleet_dir: Path, root_key: Path | None) -> None:
    """Replace the root or targets key; devices follow the new root on their next refresh.

    \b
    Examples:
      edgeops keys rotate targets --fleet ./fleet
      edgeops keys rotate root --fleet ./fleet --root-key /media/usb/root.pem
    """
    from edgeops.fleet import trust
    from edgeops.fleet.home import FleetHome

    home = FleetHome.open(fleet_dir)
    with home.repo_lock():
        path = trust.rotate_key(home.repo, role, home.expiry(), root_key)
    click.echo(f"new {role} key: {path}; export it with `edgeops keys export {role}` to keep it offline")


@cli.group()
def device() -> None:
    """Devices of a fleet.

    \b
    Examples:
      edgeops device enroll pi-001 --profile rpi4 --label site=lab --fleet ./fleet -o ./pi-001
      edgeops device renew pi-001 --fleet ./fleet
      edgeops device revoke pi-001 --fleet ./fleet --reason "stolen"
    """


@device.command("enroll")
@click.argument("device_id")
@click.option("--profile", "-p", required=True, help="The device's hardware profile.")
@click.option("--label", "labels", multiple=True, help="key=value, repeatable; releases select devices by label.")
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Device directory to write.")
@click.option("--capture", type=click.IntRange(0), default=0, show_default=True,
              help="Input samples the agent captures per drift window, for `edgeops drift export` (0: none).")
@click.option("--drift-window", type=click.IntRange(1), default=500, show_default=True,
              help="Samples per drift window the agent tests against the bundle's reference.")
@click.option("--outbox-mb", type=click.IntRange(1), default=16, show_default=True,
              help="Bound of the agent's telemetry outbox; the oldest records go (counted) when full.")
@click.option("--cert-days", type=click.IntRange(1), default=365, show_default=True,
              help="Validity of the device's certificate; renew it with `edgeops device renew`.")
@click.option("--re-enroll", is_flag=True, help="Enroll again an id that was revoked (with new credentials).")
def device_enroll(device_id: str, profile: str, labels: tuple[str, ...], fleet_dir: Path, out: Path, capture: int,
                  drift_window: int, outbox_mb: int, cert_days: int, re_enroll: bool) -> None:
    """Register a device and write its configuration: its certificate and key, the fleet CA it pins,
    and the pinned root of trust. Copy the folder to the device (it holds the device's private key).

    \b
    Examples:
      edgeops device enroll pi-001 --profile rpi4 --label site=lab --fleet ./fleet -o ./pi-001
      edgeops device enroll cam-7 --profile jetson-orin-nano --capture 16 --fleet ./fleet -o ./cam-7
    """
    from edgeops.fleet.home import FleetHome, enroll_device
    from edgeops.fleet.registry import parse_labels

    settings = {"capture": capture, "drift_window": drift_window, "outbox_bytes": outbox_mb * 2**20}
    home = FleetHome.open(fleet_dir)
    with _audited(home, "device re-enroll" if re_enroll else "device enroll", f"device {device_id}"):
        enroll_device(home, device_id, profile, parse_labels(labels), out, settings, cert_days, re_enroll)
    click.echo(f"enrolled {device_id}; on the device run: edgeops agent run {out}")


@device.command("revoke")
@click.argument("device_id")
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")
@click.option("--reason", default="", help="Why, kept in the registry.")
def device_revoke(device_id: str, fleet_dir: Path, reason: str) -> None:
    """Revoke a device: its certificate onto the CRL, out of every rollout, kept in the registry as history.

    `fleet serve` running its own broker applies it within a second (and closes the device's
    connection); a broker you run needs `edgeops fleet mosquitto-config` again and a restart.

    \b
    Example:
      edgeops device revoke pi-001 --fleet ./fleet --reason "stolen"
    """
    from edgeops.fleet.home import FleetHome, revoke_device

    home = FleetHome.open(fleet_dir)
    with _audited(home, "device revoke", f"device {device_id}", reason):
        serials = revoke_device(home, device_id, reason)
    click.echo(f"revoked {device_id} ({len(serials)} certificate{'s' if len(serials) != 1 else ''} on the CRL). "
               "With your own broker: `edgeops fleet mosquitto-config` again, then restart it.")


@device.command("renew")
@click.argument("device_id")
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")
@click.option("--days", type=click.IntRange(1), default=365, show_default=True, help="Validity of the new certificate.")
def device_renew(device_id: str, fleet_dir: Path, days: int) -> None:
    """Issue a device a new certificate for its key; `fleet serve` sends it over the device's connection.

    \b
    Example:
      edgeops device renew pi-001 --fleet ./fleet --days 365
    """
    from edgeops.fleet.home import FleetHome, renew_device
    from edgeops.protocol import certs

    home = FleetHome.open(fleet_dir)
    with _audited(home, "device renew", f"device {device_id}", f"{days} days"):
        pem = renew_device(home, device_id, days)
    _, not_after = certs.serial_and_expiry(pem)
    click.echo(f"renewed {device_id}'s certificate until {time.strftime('%Y-%m-%d', time.gmtime(not_after))}; "
               "the device installs it when `fleet serve` sends it")


def _audited(home, action: str, obj: str, detail: str = ""):
    """The audit log's record of a change made here, with the local user as its actor."""
    from edgeops.fleet import audit, registry

    return audit.recorded(registry.open_db(home.db_path), audit.cli_actor(), action, obj, detail)


_FLEET_HELP = "Fleet directory, or the URL of its HTTP API (https://HOST:PORT, see `edgeops fleet serve`)."
_TOKEN_HELP = "API token for --fleet URL (from `edgeops operator add`; api_token in fleet.json is fleet-admin's)."


def _set_ca(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    from edgeops.fleet import client

    client.ca_file = str(value) if value else None


_CA_OPTION = click.option("--ca", type=click.Path(path_type=Path, dir_okay=False), envvar="EDGEOPS_CA", show_envvar=True,
                          expose_value=False, callback=_set_ca, help="CA file (PEM) the HTTPS --fleet URL's certificate "
                          "must chain to: the fleet's pki/ca.pem [default: the system's trusted CAs].")


@device.command("list")
@click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
@click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@_CA_OPTION
@click.option("--online/--offline", default=None, help="Only devices online, or only those offline.")
@click.option("--state", type=click.Choice([*STATES, "none"]),
              help="Only devices whose latest execution is in this state (none: no report yet).")
@click.option("--filter", "words", help="Words that must each appear in the id, profile, a label (key=value), "
                                        "the latest execution's state or the installed version.")
@click.option("--limit", type=click.IntRange(1), help="At most this many devices (default: every one).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of devices, as GET /v1/devices gives them.")
def device_list(fleet_at: str, token: str | None, online: bool | None, state: str | None, words: str | None,
                limit: int | None, as_json: bool) -> None:
    """Devices of a fleet by id, with their latest execution and telemetry, read a page at a time.

    \b
    Examples:
      edgeops device list --fleet ./fleet --offline
      edgeops device list --fleet https://127.0.0.1:8420 --state failed --filter site=lab --json
    """
    from itertools import islice

    from edgeops.fleet import client, registry

    page = min(limit or registry.MAX_PAGE, registry.MAX_PAGE)
    query = {"online": None if online is None else str(online).lower(), "state": state, "q": words}

    def local(db):
        after = ""
        while after is not None:
            found = registry.page(db, after, page, online, state, tuple((words or "").split()))
            yield from found["devices"]
            after = found["next"]

    found = list(islice(_read_fleet(fleet_at, lambda url: client.devices(
        url, token, page, **{k: v for k, v in query.items() if v is not None}), local), limit))
    if as_json:
        _echo_json(found)
        return
    from edgeops.fleet.views import render_devices

    render_devices(found, _stdout_console())


@cli.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
@click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@_CA_OPTION
@click.option("--key", type=click.Path(path_type=Path), help="Targets signing key (PEM), if kept outside the fleet; --fleet DIR only.")
@click.option("--select", "selector", multiple=True, help="key=value: only devices with these labels.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Rollout plan (TOML, docs/rollouts.md); the options below override it.")
@click.option("--stages", help="Cumulative stages: percentages (10% or 10) or counts (3dev); the last is 100%. "
                               "[default: 1dev,10%,50%,100%]")
@click.option("--bake", help="Time each stage's devices run the new version before the next stage, e.g. 30s, 10m. [default: 10m]")
@click.option("--min-calls", type=click.IntRange(0), help="Inferences on the new version before its gates count, and during each stage's bake before it advances. [default: 100]")
@click.option("--abort", help="Install failures that stop the rollout, e.g. 'failed>5%,min=5'. [default: failed>5%,min=5]")
@click.option("--on-failure", type=click.Choice(["rollback", "pause"]), help="What a failed gate or abort does. [default: rollback]")
@click.option("--deadline", help="How long a device may stay silent in any install state before it is timed out. [default: 10m, 30m downloading]")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
def push(bundles: tuple[Path, ...], fleet_at: str, token: str | None, key: Path | None, selector: tuple[str, ...],
         plan_file: Path | None, stages: str | None, bake: str | None, min_calls: int | None, abort: str | None,
         on_failure: str | None, deadline: str | None, as_json: bool) -> None:
    """Sign bundles of one model version and roll them out to the matching devices, in stages.

    Each device gets the bundle built for its profile. The rollout moves to the next stage only when
    the devices of the current one all settled, ran the new version for the bake time, and its
    health gates hold against the previous version (install success, error rate, p95 latency,
    drift); otherwise it rolls back (or pauses). Through the HTTP API (--fleet URL) the fleet signs
    with the targets key in its repository; with an offline key, push with --fleet DIR --key.

    \b
    Examples:
      edgeops push dist/digits-1.1.0-rpi4.edgeops dist/digits-1.1.0-x86-vnni.edgeops --fleet ./fleet
      edgeops push dist/*.edgeops --fleet ./fleet --stages 1dev,10%,100% --bake 30m --abort 'failed>2%,min=10'
      edgeops push dist/*.edgeops --fleet ./fleet --plan rollout.toml --select site=lab
      edgeops push dist/digits-1.1.0-rpi4.edgeops --fleet ./fleet --key ~/offline/targets.pem
      EDGEOPS_TOKEN=... edgeops push dist/digits-1.1.0-rpi4.edgeops --fleet https://127.0.0.1:8420
    """
    from edgeops.fleet import client
    from edgeops.fleet.plan import load_plan, make_plan
    from edgeops.fleet.registry import parse_labels

    plan = make_plan(load_plan(plan_file) if plan_file else None, stages=stages, bake=bake, min_calls=min_calls,
                     abort=abort, on_failure=on_failure, deadline=deadline)
    if client.is_url(fleet_at):
        if key is not None:
            raise EdgeopsError("--key needs --fleet DIR: the HTTP API signs with the targets key in the fleet "
                               "repository; to sign with an offline key, push with --fleet DIR --key KEY")
        release = client.push(fleet_at, token, list(bundles), parse_labels(selector), plan.to_dict())
    else:
        from edgeops.fleet import audit
        from edgeops.fleet.home import FleetHome
        from edgeops.fleet.home import push as push_release
        from edgeops.fleet.registry import open_db

        home = FleetHome.open(fleet_at)
        with audit.recorded(open_db(home.db_path), audit.cli_actor(), "push", ", ".join(b.name for b in bundles)) as entry:
            release = push_release(home, list(bundles), parse_labels(selector), key, plan)
            entry.object = f"release {release} ({entry.object})"
    if as_json:
        _echo_json({"release": release, "rollout": release, "plan": plan.to_dict()})
    else:
        click.echo(f"release {release} pushed; rollout {release}: stages {','.join(s.label for s in plan.stages)}, "
                   f"bake {plan.bake_s:g}s, abort {plan.abort} -> {plan.on_failure} "
                   f"(watch: edgeops status --fleet {fleet_at})")


@cli.group()
def rollout() -> None:
    """Steer a rollout: pause, resume, abort or roll back (ids are release ids; `edgeops status` lists them).

    \b
    Examples:
      edgeops rollout pause 3 --fleet ./fleet --reason "support ticket 1234"
      edgeops rollout rollback 3 --fleet https://127.0.0.1:8420 --token "$EDGEOPS_TOKEN"
      edgeops rollout show 3 --fleet ./fleet --json
    """


def _rollout_action(action: str, help_text: str, example: str = ""):
    @rollout.command(action, help=help_text + """

    \b
    Examples:
      edgeops rollout ACTION 3 --fleet ./fleet
      edgeops rollout ACTION 3 --fleet https://127.0.0.1:8420 --token "$EDGEOPS_TOKEN" --reason "why" --json
    """.replace("ACTION", action) + example)
    @click.argument("rollout_id", type=int)
    @click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
    @click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
    @_CA_OPTION
    @click.option("--key", type=click.Path(path_type=Path),
                  help="Targets signing key (PEM), if kept outside the fleet: a rollback unsigns the release with it; --fleet DIR only.")
    @click.option("--reason", default="", help="Why, for the decision log.")
    @click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON afterwards.")
    def command(rollout_id: int, fleet_at: str, token: str | None, key: Path | None, reason: str, as_json: bool) -> None:
        from edgeops.fleet import client

        if key is not None and (action != "rollback" or client.is_url(fleet_at)):
            raise EdgeopsError("--key goes with `rollout rollback --fleet DIR`: it signs the release's withdrawal")
        if client.is_url(fleet_at):
            result = client.act(fleet_at, token, rollout_id, action, reason)
        else:
            from edgeops.fleet import audit
            from edgeops.fleet.home import FleetHome, withdraw_rolled_back
            from edgeops.fleet.registry import open_db
            from edgeops.fleet import rollout as engine

            home = FleetHome.open(fleet_at)
            db = open_db(home.db_path)
            with audit.recorded(db, audit.cli_actor(), f"rollout {action}", f"rollout {rollout_id}", reason):
                result = engine.act(db, rollout_id, action, reason)
                if action == "rollback":  # unsign it now, so devices may go back even before `fleet serve` runs
                    for done, names in withdraw_rolled_back(home, db, key).items():
                        engine.record(db, done, "withdraw", f"unsigned {', '.join(names)}: its devices may return to "
                                                            "their previous release", "operator")
                    result = engine.summary(db, rollout_id)
        if as_json:
            _echo_json(result)
        else:
            click.echo(f"rollout {rollout_id} ({result['model']} {result['version']}) is {result['state']}: {result['next']}")
    return command


_rollout_action("pause", "Stop assigning devices; those installing finish. `resume` continues.")
_rollout_action("resume", "Continue a paused rollout where it stopped.")
_rollout_action("abort", "End a rollout: no more devices get it; devices that have it keep it.")
_rollout_action("rollback", "End a rollout and return its devices to the release they ran before.\n\n"
                "The release's bundles are withdrawn from the signed targets metadata (devices accept an older "
                "version only then); with an offline targets key, give it with --key.",
                "  edgeops rollout rollback 3 --fleet ./fleet --key ~/offline/targets.pem\n")


@rollout.command("show")
@click.argument("rollout_id", type=int)
@click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
@click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@_CA_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rollout_show(rollout_id: int, fleet_at: str, token: str | None, as_json: bool) -> None:
    """One rollout: stages, device states, gates and the decisions taken, with their reasons.

    \b
    Examples:
      edgeops rollout show 3 --fleet ./fleet
      edgeops rollout show 3 --fleet https://127.0.0.1:8420 --json
    """
    from edgeops.fleet import client, rollout as engine

    data = _read_fleet(fleet_at, lambda url: client.rollout(url, token, rollout_id), lambda db: engine.summary(db, rollout_id))
    if as_json:
        _echo_json(data)
        return
    from edgeops.fleet.views import render_status

    render_status({"rollouts": [data], "decisions": data["decisions"]}, _stdout_console())


@cli.command()
@click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
@click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@_CA_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(fleet_at: str, token: str | None, as_json: bool) -> None:
    """Devices and releases of a fleet.

    \b
    Examples:
      edgeops status --fleet ./fleet
      edgeops status --fleet ./fleet --json
      edgeops status --fleet https://127.0.0.1:8420 --ca ./fleet/pki/ca.pem --token "$(jq -r .api_token ./fleet/fleet.json)"
    """
    from edgeops.fleet import client, registry

    data = _read_fleet(fleet_at, lambda url: client.status(url, token), registry.status)
    if as_json:
        _echo_json(data)
        return
    from edgeops.fleet.views import render_status

    render_status(data, _stdout_console())


@cli.group()
def operator() -> None:
    """Operators of the fleet's HTTP API: named tokens, each with a role.

    A viewer reads; an operator also pushes and steers rollouts; an admin also manages operators.
    The fleet's api_token (fleet.json) is the admin `fleet-admin` until it is revoked.

    \b
    Examples:
      edgeops operator add alice --role operator --fleet ./fleet
      edgeops operator list --fleet ./fleet --json
      edgeops operator revoke fleet-admin --fleet ./fleet
    """


def _operators_db(fleet_dir: Path):
    """The fleet's registry, with `fleet-admin` on the current api_token."""
    from edgeops.fleet import operators
    from edgeops.fleet.home import FleetHome
    from edgeops.fleet.registry import open_db

    home = FleetHome.open(fleet_dir)
    db = open_db(home.db_path)
    operators.sync_fleet_admin(db, home.config.get("api_token"))
    return db


_FLEET_DIR = click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")


@operator.command("add")
@click.argument("name")
@click.option("--role", required=True, help="viewer, operator or admin.")
@_FLEET_DIR
def operator_add(name: str, role: str, fleet_dir: Path) -> None:
    """Issue a token for operator NAME; it is printed once (alone on stdout), and the fleet keeps only its hash.

    \b
    Examples:
      edgeops operator add alice --role operator --fleet ./fleet
      EDGEOPS_TOKEN=$(edgeops operator add ci --role operator --fleet ./fleet) edgeops push ... --fleet https://fleet.lan:8420
    """
    from edgeops.fleet import audit, operators

    db = _operators_db(fleet_dir)
    with audit.recorded(db, audit.cli_actor(), "operator add", f"operator {name} ({role})"):
        token = operators.add(db, name, role)
    click.echo(token)
    click.echo(f"operator {name} ({role}) added; this is the only time its token is shown", err=True)


@operator.command("list")
@_FLEET_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON: name, role, created_at, revoked_at.")
def operator_list(fleet_dir: Path, as_json: bool) -> None:
    """Every operator, revoked ones too; never a token.

    \b
    Example:
      edgeops operator list --fleet ./fleet
    """
    from edgeops.fleet import operators

    found = operators.listing(_operators_db(fleet_dir))
    if as_json:
        _echo_json(found)
        return
    for o in found:
        revoked = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.localtime(o['revoked_at']))}" if o["revoked_at"] else "active"
        click.echo(f"{o['name']:<24} {o['role']:<9} {revoked}")


@operator.command("revoke")
@click.argument("name")
@_FLEET_DIR
def operator_revoke(name: str, fleet_dir: Path) -> None:
    """Revoke operator NAME's token at once (the API checks every request against the registry).

    \b
    Example:
      edgeops operator revoke fleet-admin --fleet ./fleet
    """
    from edgeops.fleet import audit, operators

    db = _operators_db(fleet_dir)
    with audit.recorded(db, audit.cli_actor(), "operator revoke", f"operator {name}"):
        operators.revoke(db, name)
    click.echo(f"operator {name} revoked")


@cli.command("audit")
@click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
@click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@_CA_OPTION
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="The latest this many entries.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: t, actor, action, object, result, detail; newest first.")
def audit_log(fleet_at: str, token: str | None, limit: int, as_json: bool) -> None:
    """The audit log: every change, who made it (an operator, cli:USER, or the rollout engine), and its result.

    \b
    Examples:
      edgeops audit --fleet ./fleet --limit 20
      edgeops audit --fleet https://fleet.lan:8420 --token "$EDGEOPS_TOKEN" --json
    """
    from edgeops.fleet import audit, client

    found = _read_fleet(fleet_at, lambda url: client.audit(url, token, limit), lambda db: audit.entries(db, limit))
    if as_json:
        _echo_json(found)
        return
    for e in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["t"]))
        click.echo(f"{when}  {e['actor']:<16} {e['action']:<16} {e['object']:<32} {e['result']}"
                   + (f"  ({e['detail']})" if e["detail"] else ""))


@cli.group()
def drift() -> None:
    """Data drift the devices report, and datasets to retrain on.

    \b
    Examples:
      edgeops drift report --fleet ./fleet
      edgeops drift export --fleet ./fleet --model digits -o ./retrain
    """


@drift.command("report")
@click.option("--fleet", "fleet_at", required=True, help=_FLEET_HELP)
@click.option("--token", envvar="EDGEOPS_TOKEN", show_envvar=True, help=_TOKEN_HELP)
@_CA_OPTION
@click.option("--model", help="Only this model.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (merged counts, tests, every device).")
def drift_report(fleet_at: str, token: str | None, model: str | None, as_json: bool) -> None:
    """Drift per model version, merged over its devices, and which need retraining.

    \b
    Examples:
      edgeops drift report --fleet ./fleet
      edgeops drift report --fleet https://127.0.0.1:8420 --model digits --json
    """
    from edgeops.fleet import client, drift as fleet_drift

    data = _read_fleet(fleet_at, lambda url: client.drift(url, token, model), lambda db: fleet_drift.report(db, model))
    if as_json:
        _echo_json(data)
        return
    from edgeops.fleet.views import render_drift

    render_drift(data, _stdout_console())


@drift.command("export")
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(path_type=Path), help="Fleet directory.")
@click.option("--model", required=True, help="Model name.")
@click.option("--version", help="Model version (default: the newest one with captured samples).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Folder to write into.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def drift_export(fleet_dir: Path, model: str, version: str | None, out: Path, as_json: bool) -> None:
    """Write a retraining dataset: the samples devices captured (samples.npz) and the merged drift
    summaries (summaries.json).

    Devices capture samples when their device.json has "agent": {"capture": N}.

    \b
    Example:
      edgeops drift export --fleet ./fleet --model digits -o ./retrain
    """
    from edgeops.fleet.drift import export
    from edgeops.fleet.home import FleetHome
    from edgeops.fleet.registry import open_db

    written = export(open_db(FleetHome.open(fleet_dir).db_path), model, version, out)
    if as_json:
        _echo_json(written)
    else:
        click.echo(f"{model} {written['version']} ({written['status']}): {written['samples']} samples -> "
                   f"{', '.join(written['files'])}")


@cli.group()
def agent() -> None:
    """The device side.

    \b
    Example:
      edgeops agent run ./pi-001
    """


@agent.command("run")
@click.argument("device_dir", type=click.Path(path_type=Path))
@click.option("--api", default="127.0.0.1:8421", show_default=True, metavar="HOST:PORT",
              help="Where to serve the local inference API (port 0: any free port; 'off': none).")
def agent_run(device_dir: Path, api: str) -> None:
    """Follow the fleet: verify, install and serve the desired release, until interrupted.

    Apps call the active model through the local API (POST /v1/infer, GET /v1/health, GET /v1/model)
    or `edgeops agent infer`. Every inference, device metrics and drift windows are kept in an
    outbox and sent to the fleet, also after being offline.

    \b
    Example:
      edgeops agent run ./pi-001
      edgeops agent run ./pi-001 --api 127.0.0.1:0
    """
    from edgeops.agent.service import run_agent

    run_agent(device_dir, None if api == "off" else api)


@agent.command("infer")
@click.argument("device_dir", type=click.Path(path_type=Path))
@click.option("--input", "input_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz with one array per model input (or an .npy for a model with one input).")
@click.option("--json", "as_json", is_flag=True, help="Print the model and every output as JSON.")
def agent_infer(device_dir: Path, input_path: Path, as_json: bool) -> None:
    """Run the model a local agent serves on the arrays in --input.

    \b
    Example:
      edgeops agent infer ./pi-001 --input sample.npz
      edgeops agent infer ./pi-001 --input sample.npz --json | jq .outputs
    """
    import numpy as np

    from edgeops.agent.api_client import infer

    try:
        loaded = np.load(input_path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{input_path} is not a readable .npz or .npy ({exc})")
    if isinstance(loaded, np.ndarray):  # an .npy: the served model's only input
        result = infer(device_dir, loaded)
    else:
        with loaded:
            result = infer(device_dir, {name: loaded[name] for name in loaded.files})
    if as_json:
        _echo_json({"model": result["model"], "version": result["version"],
                    "outputs": {k: v.tolist() for k, v in result["outputs"].items()}})
        return
    click.echo(f"{result['model']} {result['version']}")
    for name, value in result["outputs"].items():
        summary = f"class {value.reshape(-1, value.shape[-1]).argmax(1).tolist()}" if value.ndim >= 2 and value.dtype.kind == "f" else ""
        click.echo(f"  {name}: {value.dtype} {list(value.shape)} {summary}".rstrip())


def _stdout_console():
    """Rich console for stdout: 80 columns squeeze the report when piped, so use 120 there."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def main() -> None:
    cli(prog_name="edgeops")
