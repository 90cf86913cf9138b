"""
TLS from --tls-cert and --tls-key, in memory: what the files may hold and
the one line a bad one gets, the certificate a client is served (and
served again after a reload, on SIGHUP or when the files change), the
answer to a client that speaks plain HTTP, ALPN, which browsers offer, and
what /metrics says.
"""

import datetime
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test import iosim

from wsgw.config import Config, ConfigError
from wsgw.metrics import MetricsPage
from wsgw.router import RouterFactory
from wsgw.service import TLSWatchService, make_node, make_service
from wsgw.tap import Options, listener_urls
from wsgw.tls import PLAIN_ANSWER, ServerTLS, TLSFileError, TLSListenerFactory, load_certificate
from wsgw.web import ApiListenerFactory

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:OpenSSL")


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue(subject, key, issuer=None, issuer_key=None, days=1, ca=False, dns="localhost"):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer or subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key, password=None):
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.fixture
def ca():
    key = ec.generate_private_key(ec.SECP256R1())
    return issue("test CA", key, ca=True, dns=None), key


def server_files(tmp_path, ca, name="server", days=1):
    """A certificate for localhost signed by C{ca}, the chain (leaf, CA) and key written under C{name}."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue("localhost", key, issuer="test CA", issuer_key=ca_key, days=days)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(pem(cert) + pem(ca_cert))
    key_path.write_bytes(key_pem(key))
    return str(cert_path), str(key_path), cert


def connect(server_tls, ca_cert, protocols=None, wrapped=None):
    """A client trusting C{ca_cert} shakes hands, in memory, with a listener served by C{server_tls}."""
    server_factory = TLSListenerFactory(server_tls, False, wrapped or Factory.forProtocol(Protocol))
    client_options = optionsForClientTLS(
        "localhost", trustRoot=Certificate.loadPEM(pem(ca_cert)), acceptableProtocols=protocols
    )
    client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(Protocol))
    server = server_factory.buildProtocol(None)
    client = client_factory.buildProtocol(None)
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    pump.flush()
    return client


def served(client):
    """The certificate the client was served; fails if the handshake did not complete."""
    peer = client.getPeerCertificate()
    assert peer is not None, "no TLS session"
    return peer.to_cryptography()


# -- the files ------------------------------------------------------------------------


def test_a_chain_and_its_key_load_with_the_names_and_expiry_logs_need(tmp_path, ca):
    cert_path, key_path, _cert = server_files(tmp_path, ca)
    loaded = load_certificate(cert_path, key_path)
    assert loaded.names == "localhost"
    in_a_day = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    assert abs(loaded.not_after - in_a_day) < datetime.timedelta(minutes=5)
    # The intermediate goes with the handshake, for clients that only know the root.
    assert len(loaded.options.extraCertChain) == 1


@pytest.mark.parametrize("key_first", [True, False])
def test_one_file_holding_the_key_and_the_chain_serves_as_both(tmp_path, ca, key_first):
    cert_path, key_path, cert = server_files(tmp_path, ca)
    chain, key = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    both = tmp_path / "both.pem"
    both.write_bytes(key + chain if key_first else chain + key)
    tls = ServerTLS(str(both), str(both))
    assert served(connect(tls, ca[0])) == cert
    assert len(tls.current.options.extraCertChain) == 1


def test_a_certificate_without_dns_names_is_named_by_its_common_name(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "c.pem").write_bytes(pem(issue("gateway.example", key, dns=None)))
    (tmp_path / "k.pem").write_bytes(key_pem(key))
    assert load_certificate(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")).names == "gateway.example"


@pytest.mark.parametrize(
    "mistake, which, says",
    [
        ("missing cert", "cert", "cannot read the certificate"),
        ("missing key", "key", "cannot read the private key"),
        ("key as cert", "cert", "holds no PEM certificate"),
        ("cert as key", "key", "holds no PEM private key"),
        ("encrypted key", "key", "is encrypted: give it unencrypted"),
        ("another key", "key", "does not belong to the first certificate"),
        ("chain reversed", "key", "the server's own certificate goes first"),
    ],
)
def test_files_that_cannot_serve_say_which_and_why(tmp_path, ca, mistake, which, says):
    cert_path, key_path, _cert = server_files(tmp_path, ca)
    other_key = ec.generate_private_key(ec.SECP256R1())
    if mistake == "missing cert":
        cert_path = str(tmp_path / "nope.crt")
    elif mistake == "missing key":
        key_path = str(tmp_path / "nope.key")
    elif mistake == "key as cert":
        cert_path = key_path
    elif mistake == "cert as key":
        key_path = cert_path
    elif mistake == "encrypted key":
        (tmp_path / "server.key").write_bytes(key_pem(other_key, password=b"secret"))
    elif mistake == "another key":
        (tmp_path / "server.key").write_bytes(key_pem(other_key))
    elif mistake == "chain reversed":
        leaf, root = x509.load_pem_x509_certificates((tmp_path / "server.crt").read_bytes())
        (tmp_path / "server.crt").write_bytes(pem(root) + pem(leaf))
    with pytest.raises(TLSFileError) as error:
        load_certificate(cert_path, key_path)
    assert error.value.which == which
    assert says in str(error.value)
    assert "\n" not in str(error.value)


# -- the configuration ------------------------------------------------------------


def test_config_takes_the_certificate_and_key_together_only():
    assert Config(tls_cert="c.pem", tls_key="k.pem").tls_cert == "c.pem"
    with pytest.raises(ConfigError, match="tls_key is missing") as error:
        Config(tls_cert="c.pem")
    assert error.value.field == "tls_key"
    with pytest.raises(ConfigError, match="tls_cert is missing"):
        Config(tls_key="k.pem")


def test_config_refuses_tls_around_an_ssl_listener():
    with pytest.raises(ConfigError, match="is TLS already") as error:
        Config(listen=("tcp:80", "ssl:443:privateKey=k.pem"), tls_cert="c.pem", tls_key="k.pem")
    assert error.value.field == "tls_cert"


def test_the_command_line_blames_the_option_or_variable_that_named_a_bad_file(tmp_path, ca):
    cert_path, key_path, _cert = server_files(tmp_path, ca)
    options = Options(environ={})
    options.parseOptions(["--tls-cert", cert_path, "--tls-key", key_path])
    assert (options.config.tls_cert, options.config.tls_key) == (cert_path, key_path)
    (tmp_path / "other.key").write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(usage.UsageError, match=r"^--tls-key: the private key in .* does not belong"):
        Options(environ={}).parseOptions(["--tls-cert", cert_path, "--tls-key", str(tmp_path / "other.key")])
    with pytest.raises(usage.UsageError, match=r"^WSGW_TLS_KEY: the private key in .* does not belong"):
        Options(environ={"WSGW_TLS_CERT": cert_path, "WSGW_TLS_KEY": str(tmp_path / "other.key")}).parseOptions([])
    with pytest.raises(usage.UsageError, match=r"^--tls-cert: cannot read the certificate"):
        Options(environ={}).parseOptions(["--tls-cert", str(tmp_path / "none.crt"), "--tls-key", key_path])


def test_the_command_line_says_which_half_is_missing(tmp_path, ca):
    cert_path, _key_path, _cert = server_files(tmp_path, ca)
    with pytest.raises(usage.UsageError, match="--tls-key is missing: --tls-cert and --tls-key go together"):
        Options(environ={}).parseOptions(["--tls-cert", cert_path])


def test_listeners_wrapped_in_tls_are_announced_as_wss():
    tcp = IPv4Address("TCP", "0.0.0.0", 443)
    assert listener_urls("systemd:domain=INET:index=0", tcp, True, True, tls=True) == {
        "ws_url": "wss://0.0.0.0:443/ws",
        "api_url": "https://0.0.0.0:443/tapr/ws/conn/",
    }
    assert listener_urls("unix:/run/w.sock", UNIXAddress(b"/run/w.sock"), True, False, tls=True) == {
        "ws_url": "wss://localhost/ws on unix:/run/w.sock"
    }
    assert listener_urls("tcp:80", tcp, True, False) == {"ws_url": "ws://0.0.0.0:443/ws"}


# -- serving and reloading --------------------------------------------------------


def test_clients_are_served_the_certificate_and_its_chain(tmp_path, ca, log_events):
    cert_path, key_path, cert = server_files(tmp_path, ca)
    tls = ServerTLS(cert_path, key_path)
    assert served(connect(tls, ca[0])) == cert
    said = [e for e in log_events if e.get("log_namespace") == "wsgw.tls"]
    assert [e["names"] for e in said] == ["localhost"] and said[0]["log_level"] == LogLevel.info


def test_a_reload_serves_the_new_certificate_to_new_connections_only(tmp_path, ca, log_events):
    cert_path, key_path, first = server_files(tmp_path, ca)
    tls = ServerTLS(cert_path, key_path)
    before = connect(tls, ca[0])
    server_files(tmp_path, ca)  # renewed in place: same paths, new key and certificate
    renewed = x509.load_pem_x509_certificates((tmp_path / "server.crt").read_bytes())[0]
    assert tls.reload() is True
    assert served(connect(tls, ca[0])) == renewed != first
    assert served(before) == first  # the open connection keeps its session
    assert any("reloaded the TLS certificate" in e.get("log_format", "") for e in log_events)


def test_a_reload_from_broken_files_keeps_the_certificate_in_use(tmp_path, ca, log_events):
    cert_path, key_path, first = server_files(tmp_path, ca)
    tls = ServerTLS(cert_path, key_path)
    (tmp_path / "server.key").write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))  # half renewed
    assert tls.reload() is False
    assert served(connect(tls, ca[0])) == first
    errors = [e for e in log_events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1 and "does not belong" in errors[0]["error"]


# -- renewals noticed without SIGHUP --------------------------------------------------


def renew(tmp_path, ca, cert_path, key_path, *, cert=True, key=True):
    """
    A renewal as certbot and most tools make it: new files written beside
    the old, then renamed over them (new inodes); C{cert}/C{key} False
    leaves that half as it was.  Returns the new certificate.
    """
    new_cert, new_key, issued = server_files(tmp_path, ca, name="next")
    if cert:
        os.replace(new_cert, cert_path)
    if key:
        os.replace(new_key, key_path)
    return issued


def tls_service(tmp_path, ca, interval):
    """C{make_service} serving TLS from fresh files, its looks every C{interval} seconds on a fake clock."""
    cert_path, key_path, first = server_files(tmp_path, ca)
    reactor = MemoryReactorClock()
    config = Config(listen=["tcp:40010"], tls_cert=cert_path, tls_key=key_path, tls_watch_interval=interval)
    service = make_service(config, reactor=reactor)
    service.startService()
    return service, reactor, cert_path, key_path, first


def test_renewed_files_are_served_from_the_next_look_on(tmp_path, ca, log_events):
    service, reactor, cert_path, key_path, first = tls_service(tmp_path, ca, interval=60)
    tls = service.node.tls
    reactor.advance(60)  # nothing changed: nothing read
    assert tls.reloads == {"ok": 0, "failed": 0}
    renewed = renew(tmp_path, ca, cert_path, key_path)
    reactor.advance(59)
    assert served(connect(tls, ca[0])) == first
    reactor.advance(1)
    assert served(connect(tls, ca[0])) == renewed != first
    assert tls.reloads == {"ok": 1, "failed": 0}
    assert any("reloaded the TLS certificate" in e.get("log_format", "") for e in log_events)
    reactor.advance(600)  # and read once, not at every look
    assert tls.reloads == {"ok": 1, "failed": 0}
    service.stopService()
    assert reactor.getDelayedCalls() == []


def test_a_file_rewritten_in_place_is_read_again(tmp_path, ca):
    cert_path, key_path, first = server_files(tmp_path, ca)
    tls = ServerTLS(cert_path, key_path)
    renewed_cert, renewed_key, renewed = server_files(tmp_path, ca, name="next")
    # Written over, as `cp` does: the same inode, its size and modification time new.
    for source, target in ((renewed_cert, cert_path), (renewed_key, key_path)):
        Path(target).write_bytes(Path(source).read_bytes())
        later = os.stat(target).st_mtime + 10
        os.utime(target, (later, later))
    assert tls.reload_if_changed() is True
    assert served(connect(tls, ca[0])) == renewed != first


def test_a_kubernetes_secret_update_is_read_again(tmp_path, ca):
    # A mounted secret: cert.pem -> ..data/cert.pem, ..data -> a folder of
    # this version; an update writes a new folder and swaps ..data at once.
    cert_path, key_path, first = server_files(tmp_path, ca)
    mount = tmp_path / "secret"
    mount.mkdir()

    def publish(version, cert_file, key_file):
        folder = mount / f"..{version}"
        folder.mkdir()
        os.replace(cert_file, folder / "tls.crt")
        os.replace(key_file, folder / "tls.key")
        (mount / "..data_tmp").symlink_to(folder.name)
        os.replace(mount / "..data_tmp", mount / "..data")

    publish("2026_01", cert_path, key_path)
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")
    tls = ServerTLS(str(mount / "tls.crt"), str(mount / "tls.key"))
    assert tls.reload_if_changed() is None
    assert served(connect(tls, ca[0])) == first
    renewed_cert, renewed_key, renewed = server_files(tmp_path, ca, name="next")
    publish("2026_02", renewed_cert, renewed_key)
    assert tls.reload_if_changed() is True
    assert served(connect(tls, ca[0])) == renewed


def test_a_half_done_renewal_is_refused_once_and_read_when_complete(tmp_path, ca, log_events):
    service, reactor, cert_path, key_path, first = tls_service(tmp_path, ca, interval=5)
    tls = service.node.tls
    renew(tmp_path, ca, cert_path, key_path, key=False)  # the certificate is new, its key not there yet
    reactor.advance(5)
    assert served(connect(tls, ca[0])) == first
    reactor.advance(50)  # nothing changed since: not read again, not logged again
    errors = [e for e in log_events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1 and "does not belong" in errors[0]["error"]
    assert tls.reloads == {"ok": 0, "failed": 1}
    new_key = Path(tmp_path / "next.key")
    os.replace(new_key, key_path)  # the key that goes with it arrives
    renewed = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
    reactor.advance(5)
    assert served(connect(tls, ca[0])) == renewed
    assert tls.reloads == {"ok": 1, "failed": 1}


def test_a_missing_file_is_logged_once_and_read_when_back(tmp_path, ca, log_events):
    cert_path, key_path, first = server_files(tmp_path, ca)
    tls = ServerTLS(cert_path, key_path)
    os.rename(cert_path, cert_path + ".moved")
    assert tls.reload_if_changed() is False
    assert tls.reload_if_changed() is None
    errors = [e for e in log_events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1 and "cannot read the certificate" in errors[0]["error"]
    os.rename(cert_path + ".moved", cert_path)
    assert tls.reload_if_changed() is True
    assert served(connect(tls, ca[0])) == first


def test_no_looks_with_an_interval_of_zero(tmp_path, ca):
    service, reactor, cert_path, key_path, first = tls_service(tmp_path, ca, interval=0)
    renew(tmp_path, ca, cert_path, key_path)
    reactor.advance(3600)
    assert served(connect(service.node.tls, ca[0])) == first  # SIGHUP alone reads them again
    assert service.node.tls.reloads == {"ok": 0, "failed": 0}


def test_a_surprise_while_reading_does_not_end_the_looks(log_events):
    looks = []

    class Surprising:
        def reload_if_changed(self):
            looks.append(len(looks))
            if len(looks) == 1:
                raise RuntimeError("a file the checks did not foresee")

    clock = Clock()
    service = TLSWatchService(Surprising(), 5, clock)
    service.startService()
    clock.advance(5)
    clock.advance(5)
    assert looks == [0, 1]
    [failure] = [e["log_failure"] for e in log_events if "log_failure" in e]
    assert failure.check(RuntimeError)
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_the_interval_is_an_option_and_a_variable(tmp_path, ca):
    cert_path, key_path, _cert = server_files(tmp_path, ca)
    files = ["--tls-cert", cert_path, "--tls-key", key_path]
    assert Config().tls_watch_interval == 60
    options = Options()
    options.parseOptions([*files, "--tls-watch-interval", "2.5"])
    assert options.config.tls_watch_interval == 2.5
    options = Options(environ={"WSGW_TLS_WATCH_INTERVAL": "0"})
    options.parseOptions(files)
    assert options.config.tls_watch_interval == 0
    with pytest.raises(usage.UsageError, match="--tls-watch-interval"):
        Options().parseOptions([*files, "--tls-watch-interval", "-1"])


def test_an_expired_certificate_is_served_with_a_warning(tmp_path, ca, log_events):
    cert_path, key_path, _cert = server_files(tmp_path, ca, days=-1)
    ServerTLS(cert_path, key_path)
    warnings = [e for e in log_events if e.get("log_level") == LogLevel.warn and e.get("log_namespace") == "wsgw.tls"]
    assert len(warnings) == 1 and "EXPIRED" in warnings[0]["log_format"]


@pytest.mark.parametrize(
    "first",
    [b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\r\n", b"G", b"\x00\x01garbage"],
)
def test_plain_text_to_a_tls_listener_is_answered_400_saying_so(tmp_path, ca, log_events, first):
    """ws:// or http:// to a wss:// port: one answer that says what to do, then the connection closes."""
    cert_path, key_path, _cert = server_files(tmp_path, ca)
    reached = []
    factory = TLSListenerFactory(ServerTLS(cert_path, key_path), False, Factory.forProtocol(Protocol))
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.wrappedProtocol.dataReceived = reached.append
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.makeConnection(transport)
    protocol.dataReceived(first)
    protocol.dataReceived(b"more of the same")
    answer = transport.value()
    assert answer == PLAIN_ANSWER
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 ") and b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"code": 400, "message": "this port speaks TLS: use https:// or wss://"}
    assert transport.disconnecting and reached == []
    [said] = [e for e in log_events if e.get("log_namespace") == "wsgw.tls" and "plain text" in e["log_format"]]
    assert said["peer"].endswith("port=5555)")


@pytest.mark.parametrize("factory_name", ["RouterFactory", "ApiListenerFactory"])
def test_a_client_offering_alpn_gets_http_1_1(tmp_path, ca, factory_name):
    """Browsers offer h2 and http/1.1; the listeners' factories must pick one or the handshake fails."""
    cert_path, key_path, _cert = server_files(tmp_path, ca)
    wrapped = {
        "RouterFactory": lambda: RouterFactory(None, None, None, 10.0),
        "ApiListenerFactory": lambda: ApiListenerFactory(None),
    }[factory_name]()
    wrapped.buildProtocol = lambda addr: Protocol()  # the handshake only
    client = connect(ServerTLS(cert_path, key_path), ca[0], protocols=[b"h2", b"http/1.1"], wrapped=wrapped)
    assert client.negotiatedProtocol == b"http/1.1"


def scrape(page):
    samples = {}
    for family in text_string_to_metric_families(generate_latest(page.registry).decode()):
        for sample in family.samples:
            samples[sample.name + "".join(f"|{v}" for v in sample.labels.values())] = sample.value
    return samples


def test_metrics_say_when_the_certificate_expires_and_how_reloads_went(tmp_path, ca):
    cert_path, key_path, _cert = server_files(tmp_path, ca, days=30)
    node = make_node(Config(tls_cert=cert_path, tls_key=key_path), reactor=Clock())
    page = MetricsPage(node.gateway, tls=node.tls)
    first = node.tls.current.not_after.timestamp()
    in_30_days = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)
    assert abs(first - in_30_days.timestamp()) < 300
    assert scrape(page)["wsgw_tls_certificate_expiry_timestamp_seconds"] == first

    (tmp_path / "server.key").write_bytes(key_pem(ec.generate_private_key(ec.SECP256R1())))
    node.tls.reload()
    server_files(tmp_path, ca, days=90)  # renewed
    node.tls.reload()
    samples = scrape(page)
    assert samples["wsgw_tls_reloads_total|failed"] == 1 and samples["wsgw_tls_reloads_total|ok"] == 1
    assert samples["wsgw_tls_certificate_expiry_timestamp_seconds"] - first > 59 * 86400


def test_without_tls_the_metrics_say_nothing_of_it():
    node = make_node(Config(), reactor=Clock())
    assert node.tls is None
    assert not [name for name in scrape(MetricsPage(node.gateway, tls=node.tls)) if "tls" in name]
