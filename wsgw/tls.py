"""
TLS on the gateway's own listeners from a certificate and key on disk
(C{--tls-cert}, C{--tls-key}), around any endpoint: a socket systemd
passes (socket activation on 443, with no capability to bind it), a TCP
port, a UNIX socket.  Twisted's C{ssl:} endpoint binds a TCP port of its
own, so it cannot serve the first.

The files are read at start and again on L{ServerTLS.reload}: on SIGHUP,
and from L{ServerTLS.reload_if_changed} when a look finds either file
replaced or rewritten, as a renewal or a Kubernetes secret update does.
Handshakes after it get the new certificate, open connections keep theirs,
and files that cannot be used leave the certificate in use in place.  A
client that speaks plain HTTP to such a listener (C{http://} or C{ws://}
to a C{wss://} port) is told so in a 400, not dropped unanswered
(L{TLSListenerFactory}).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional, Tuple, cast

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from .jsonio import to_json

log = Logger()


class TLSFileError(ValueError):
    """
    A certificate or key file that cannot serve TLS; C{which} is C{"cert"}
    or C{"key"}, the option to blame.
    """

    def __init__(self, which: str, message: str):
        super().__init__(message)
        self.which = which


@attr.s(frozen=True, slots=True)
class ServerCertificate:
    """A certificate chain and its key, ready to serve, and what logs say of it."""

    options: CertificateOptions = attr.ib(repr=False)
    #: The names it is for (its DNS names, else its common name).
    names: str = attr.ib()
    not_after: datetime.datetime = attr.ib()

    def expired(self, now: datetime.datetime) -> bool:
        return now >= self.not_after


def load_certificate(cert_path: str, key_path: str) -> ServerCertificate:
    """
    The certificate chain in C{cert_path} (PEM, the server's own first,
    then any intermediates) with the private key in C{key_path} (PEM,
    unencrypted); raises L{TLSFileError} saying what is wrong and what to
    do.
    """
    cert_pem = _read(cert_path, "cert", "certificate")
    key_pem = _read(key_path, "key", "private key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSFileError(
            "cert", f"{cert_path} holds no PEM certificate (a block starting -----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = load_pem_private_key(key_pem, password=None)
    except TypeError:  # cryptography's word for a key that needs a password
        raise TLSFileError(
            "key", f"the private key in {key_path} is encrypted: give it unencrypted (the gateway cannot ask)"
        ) from None
    except ValueError:
        raise TLSFileError(
            "key", f"{key_path} holds no PEM private key (a block starting -----BEGIN PRIVATE KEY----- or similar)"
        ) from None
    except UnsupportedAlgorithm:
        raise TLSFileError("key", f"the private key in {key_path} is of a kind OpenSSL here cannot use") from None
    # pyOpenSSL takes cryptography's objects (and deprecates its own);
    # Twisted's annotations still name pyOpenSSL's.
    options = CertificateOptions(
        privateKey=cast(Any, key), certificate=cast(Any, chain[0]), extraCertChain=cast(Any, chain[1:])
    )
    try:
        options.getContext()  # OpenSSL checks that the key is the certificate's
    except SSL.Error:
        raise TLSFileError(
            "key",
            f"the private key in {key_path} does not belong to the first certificate in {cert_path}"
            " (the server's own certificate goes first, then its intermediates)",
        ) from None
    return ServerCertificate(options, _names(chain[0]), _not_after(chain[0]))


def _read(path: str, which: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFileError(which, f"cannot read the {what} {path}: {e.strerror}") from None


def _names(cert: x509.Certificate) -> str:
    try:
        names: List[str] = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return ", ".join(names) or "no name"


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    after = getattr(cert, "not_valid_after_utc", None)  # cryptography 42 and later
    if after is None:
        after = cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return after


#: A file as L{file_state} sees it.
FileState = Tuple[int, ...]


def file_state(path: str) -> FileState:
    """
    What tells one version of the file at C{path} from another: the file
    it names in the end (symbolic links followed, as a Kubernetes secret's
    are), its size and its modification time; or, when it cannot be
    looked at, the error's number.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return (e.errno or -1,)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@implementer(IOpenSSLServerConnectionCreator)
@attr.s(eq=False)
class ServerTLS:
    """
    What a TLS listener asks for each new connection: a TLS connection
    with the certificate loaded last.  Wrap a factory with it as
    C{TLSListenerFactory(tls, False, factory)}.
    """

    cert_path: str = attr.ib()
    key_path: str = attr.ib()
    #: What new connections are served with.
    current: ServerCertificate = attr.ib(init=False)
    #: Reloads by result (C{ok}, C{failed}), for /metrics.
    reloads: Dict[str, int] = attr.ib(factory=lambda: {"ok": 0, "failed": 0}, init=False)
    #: What the files were when they were last read (L{file_state}).
    _read_state: Tuple[FileState, FileState] = attr.ib(init=False)

    def __attrs_post_init__(self) -> None:
        self._read_state = self._files_now()
        self.current = load_certificate(self.cert_path, self.key_path)
        self._say("serving TLS with the certificate for {names} ({cert}), valid until {not_after}")

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.current.options.getContext(), None)

    def reload(self) -> bool:
        """
        Reads the files again; on success new connections get what they
        hold, else the certificate in use stays and the error is logged.
        """
        # Taken before reading: a file rewritten while it is read is seen
        # as changed at the next look, and read again then.
        self._read_state = self._files_now()
        try:
            self.current = load_certificate(self.cert_path, self.key_path)
        except TLSFileError as e:
            self.reloads["failed"] += 1
            log.error("cannot reload the TLS certificate: {error}; still serving the one loaded before", error=str(e))
            return False
        self.reloads["ok"] += 1
        self._say("reloaded the TLS certificate for {names} ({cert}), valid until {not_after}")
        return True

    def reload_if_changed(self) -> Optional[bool]:
        """
        L{reload} if either file is not what it was when last read (another
        file in its place, other contents); L{None} when both are as they
        were.  Files that could not be used are read again only once
        they change again, so a broken renewal is logged once, not at every
        look.
        """
        if self._files_now() == self._read_state:
            return None
        log.info("the TLS certificate or key file changed; reading both again", cert=self.cert_path, key=self.key_path)
        return self.reload()

    def _files_now(self) -> Tuple[FileState, FileState]:
        return file_state(self.cert_path), file_state(self.key_path)

    def _say(self, text: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        fields = {
            "names": self.current.names,
            "cert": self.cert_path,
            "not_after": f"{self.current.not_after:%Y-%m-%d %H:%M} UTC",
        }
        if self.current.expired(now):
            log.warn(text + "; it has EXPIRED: clients will refuse it", **fields)
        else:
            log.info(text, **fields)


#: A TLS connection's first byte: a record of the handshake (content type 22).
_HANDSHAKE_RECORD = 0x16
_PLAIN_MESSAGE = "this port speaks TLS: use https:// or wss://"
_PLAIN_BODY = to_json({"code": 400, "message": _PLAIN_MESSAGE}) + b"\n"
PLAIN_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Connection: close\r\n\r\n" % len(_PLAIN_BODY)
) + _PLAIN_BODY


class TLSListenerProtocol(TLSMemoryBIOProtocol):
    """
    TLS for one connection of a listener; a client whose first byte is not
    a TLS record spoke plain HTTP (or anything else) and gets
    L{PLAIN_ANSWER}, written past TLS, before the connection is closed.
    """

    _first = True
    _plain = False

    def dataReceived(self, data: bytes) -> None:
        if self._plain:
            return
        if self._first and data:
            self._first = False
            if data[0] != _HANDSHAKE_RECORD:
                self._plain = True
                transport = self.transport
                assert transport is not None
                log.info(
                    "plain text from {peer} on a TLS listener; answered 400 ({message})",
                    peer=str(transport.getPeer()),
                    message=_PLAIN_MESSAGE,
                )
                transport.write(PLAIN_ANSWER)
                transport.loseConnection()
                return
        super().dataReceived(data)


class TLSListenerFactory(TLSMemoryBIOFactory):
    """C{TLSMemoryBIOFactory(tls, False, factory)} whose connections are L{TLSListenerProtocol}s."""

    protocol = TLSListenerProtocol
    noisy = False
