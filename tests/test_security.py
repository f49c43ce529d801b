"""TLS, mutual TLS with certificate reload, bearer tokens, message size and keepalive limits, on real servers."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2

from jachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import greedy, health_stub, user, wait_until
from tests.servers import Server, serving, start

REQUEST = chat_pb2.GenerateRequest(turns=[user("やあ")], sampling=greedy(2))


class Authority:
    """A throwaway certificate authority."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, self.key.public_key(), subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @staticmethod
    def _builder(
        subject: x509.Name, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, name: str, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for localhost (server) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), self.cert.subject
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def write_server_files(folder: Path, ca: Authority) -> tuple[Path, Path]:
    cert, key = ca.issue("localhost", server=True)
    (folder / "tls.crt").write_bytes(cert)
    (folder / "tls.key").write_bytes(key)
    return folder / "tls.crt", folder / "tls.key"


def secure_call(server: Server, ca: Authority, client: tuple[bytes, bytes] | None = None) -> int:
    credentials = grpc.ssl_channel_credentials(ca.pem, *(reversed(client) if client else (None, None)))
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        return int(chat_pb2_grpc.ChatServiceStub(channel).Generate(REQUEST, timeout=10).usage.completion_tokens)


@pytest.fixture
def ca() -> Authority:
    return Authority("jachat test CA")


def test_tls_serves_encrypted_and_refuses_plaintext(model_f32: Path, tmp_path: Path, ca: Authority) -> None:
    cert, key = write_server_files(tmp_path, ca)
    server = start(model_f32, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert secure_call(server, ca) == 2
        with server.channel() as plaintext, pytest.raises(grpc.RpcError) as info:
            chat_pb2_grpc.ChatServiceStub(plaintext).Generate(REQUEST, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):
            secure_call(server, Authority("a stranger"))  # a server certificate we do not trust
    finally:
        assert server.stop() == 0


def test_mutual_tls_requires_a_client_certificate_and_reloads_on_change(
    model_f32: Path, tmp_path: Path, ca: Authority
) -> None:
    cert, key = write_server_files(tmp_path, ca)
    client_ca = tmp_path / "clients.pem"
    client_ca.write_bytes(ca.pem)
    server = start(model_f32, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca))
    try:
        client = ca.issue("a client", server=False)
        assert secure_call(server, ca, client) == 2
        with pytest.raises(grpc.RpcError):
            secure_call(server, ca)  # no client certificate
        with pytest.raises(grpc.RpcError):
            secure_call(server, ca, Authority("another CA").issue("intruder", server=False))
        # rotate everything to a new authority while the server runs
        rotated = Authority("rotated CA")
        stamps = {p: p.stat().st_mtime_ns for p in (cert, key, client_ca)}
        write_server_files(tmp_path, rotated)
        client_ca.write_bytes(rotated.pem)
        for path, before in stamps.items():  # a change the watch sees, however coarse the file system's clock
            os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
        assert secure_call(server, rotated, rotated.issue("new client", server=False)) == 2
        with pytest.raises(grpc.RpcError):
            secure_call(server, ca, client)  # the old certificates no longer work
        assert server.alive()  # no restart
    finally:
        assert server.stop() == 0


@pytest.fixture
def token_server(model_f32: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token per line\nfirst-secret-token\nsecond-secret-token\n")
    with serving(model_f32, "--auth-token-file", str(tokens)) as server:
        yield server, tokens


def test_bearer_tokens_guard_every_call_but_health_and_reflection(token_server: tuple[Server, Path]) -> None:
    server, tokens = token_server
    before = server.scrape()
    with server.channel() as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "first-secret-token"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(REQUEST, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as streamed:
            list(stub.GenerateStream(chat_pb2.GenerateStreamRequest(turns=REQUEST.turns), timeout=10))
        assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after_rejections = server.scrape()
        for token in ("first-secret-token", "second-secret-token"):
            reply = stub.Generate(REQUEST, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert reply.usage.completion_tokens == 2
        health = health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # exempt
        _touch(tokens, "rotated-token\n")  # re-read on change, no restart
        with pytest.raises(grpc.RpcError) as old:
            stub.Generate(REQUEST, metadata=(("authorization", "Bearer first-secret-token"),), timeout=10)
        assert old.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Generate(REQUEST, metadata=(("authorization", "Bearer rotated-token"),), timeout=10).usage
    assert (
        after_rejections['jachat_rejected_total{api="grpc",priority="interactive",reason="unauthenticated"}']
        - before['jachat_rejected_total{api="grpc",priority="interactive",reason="unauthenticated"}']
        == 4
    )
    # refused before any model work
    assert after_rejections["jachat_generated_tokens_total"] == before["jachat_generated_tokens_total"]


def test_oversized_messages_are_refused(server: Server) -> None:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as info:
        big = chat_pb2.GenerateRequest(turns=[user("あ" * 2_000_000)])  # about 6 MB of UTF-8
        chat_pb2_grpc.ChatServiceStub(channel).Generate(big, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_clients_that_ping_too_often_are_sent_away(server: Server) -> None:
    states: list[grpc.ChannelConnectivity] = []
    options = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(server.target, options=options) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        assert chat_pb2_grpc.ChatServiceStub(channel).Generate(REQUEST, timeout=10).usage.completion_tokens == 2
        wait_until(
            lambda: grpc.ChannelConnectivity.IDLE in states[2:],
            "the server closed the abusive connection (the channel IDLE again)",
            timeout=10,
        )


async def _tenant_seen(request: object, context: object) -> str | None:
    from jachat.service.edge.grpc.security import authenticated_tenant

    return authenticated_tenant.get()


HANDLER: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(_tenant_seen)


def _call(interceptor: object, authorization: str | None) -> str | None:
    """What one call's handler sees behind the interceptor: the tenant it was authenticated as, or "denied"."""
    import asyncio
    from types import SimpleNamespace

    async def continuation(details: object) -> object:
        return HANDLER

    class Context:
        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise PermissionError(code)

    async def run() -> str | None:
        metadata = () if authorization is None else (("authorization", authorization),)
        details = SimpleNamespace(method="/jachat.v1.ChatService/Generate", invocation_metadata=metadata)
        handler = await interceptor.intercept_service(continuation, details)  # type: ignore[attr-defined]
        try:
            seen: str | None = await handler.unary_unary(b"", Context())
            return seen
        except PermissionError:
            return "denied"

    return asyncio.run(run())


def test_the_interceptor_refuses_strangers_and_hands_the_tenant_to_the_call(tmp_path: Path) -> None:
    """The token is compared once per call: the tenant the interceptor found is what the call's frame reads."""
    from jachat.service.edge.grpc.security import TokenAuthInterceptor
    from jachat.service.edge.identity import Tokens

    path = tmp_path / "tokens"
    path.write_text("alice secret-a\nsecret-b\n")
    interceptor = TokenAuthInterceptor(Tokens(path))
    assert _call(interceptor, "Bearer secret-a") == "alice"
    assert (_call(interceptor, "Bearer secret-b") or "").startswith("token-")
    assert _call(interceptor, "Bearer nope") == "denied" and _call(interceptor, None) == "denied"


def _touch(path: Path, text: str) -> None:
    """Rewrite a watched file and move its mtime on explicitly: no wait for the file system's clock to tick."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_token_file_rules_scheme_comments_and_a_vanishing_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from jachat.service.edge.identity import Tokens

    tokens = tmp_path / "tokens"
    tokens.write_text("  # an indented comment is still a comment\n\tsecret-one  \n\n# another\nsecret-two\n")
    registry = Tokens(tokens)

    def tenant(authorization: str | None) -> str | None:
        return registry.authenticate(() if authorization is None else [("authorization", authorization)])

    for header in ("Bearer secret-one", "bearer secret-one", "BEARER secret-two", "Bearer  secret-two "):
        assert tenant(header) is not None, header  # RFC 6750: the scheme is case-insensitive
    refused: tuple[str | None, ...] = (None, "Bearer # an indented comment", "Bearer", "Basic secret-one", "secret")
    for wrong in refused:
        assert tenant(wrong) is None, wrong

    caplog.set_level("INFO", logger="jachat.security")
    tokens.unlink()  # deleted: the current tokens stay, and it is said once, without a traceback
    for _ in range(3):
        assert tenant("Bearer secret-one") is not None
    _touch(tokens, "# emptied by a careless edit\n")  # no token left: keep the current ones, say so once
    for _ in range(3):
        assert tenant("Bearer secret-two") is not None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]
    assert "keeping the current 2 tokens" in warnings[0].getMessage() and "holds no token" in warnings[1].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    _touch(tokens, "secret-three\n")  # a good file again is taken at once
    assert tenant("Bearer secret-three") is not None
    assert tenant("Bearer secret-one") is None


def test_the_http_port_speaks_tls_whenever_grpc_does(model_f32: Path, tmp_path: Path, ca: Authority) -> None:
    """The bearer tokens are the same on both ports: with --tls-cert the HTTP API is HTTPS (the openai SDK over
    https), plain HTTP is refused, a rotated certificate is served to new connections without a restart, and
    --http-plaintext is the explicit way out (TLS terminated in front)."""
    import ssl

    import httpx2 as httpx  # the openai SDK's own HTTP client
    import openai

    cert, key = write_server_files(tmp_path, ca)
    authority = tmp_path / "ca.pem"
    authority.write_bytes(ca.pem)
    flags = ("--tls-cert", str(cert), "--tls-key", str(key), "--http-host", "127.0.0.1", "--http-port", "0")
    with serving(model_f32, *flags) as server:
        assert server.http_port is not None
        base = f"https://localhost:{server.http_port}/v1"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(authority))) as https:
            sdk = openai.OpenAI(base_url=base, api_key="-", http_client=https, max_retries=0)
            model = sdk.models.list().data[0].id
            reply = sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "やあ"}], max_tokens=2
            )
            assert reply.usage is not None and reply.usage.completion_tokens == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port: no answer
            httpx.get(f"http://127.0.0.1:{server.http_port}/health", timeout=10)
        rotated = Authority("rotated CA")
        stamps = {p: p.stat().st_mtime_ns for p in (cert, key)}
        write_server_files(tmp_path, rotated)
        for path, before in stamps.items():
            os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
        fresh = tmp_path / "rotated.pem"
        fresh.write_bytes(rotated.pem)
        with httpx.Client(verify=ssl.create_default_context(cafile=str(fresh))) as https:
            assert https.get(f"https://localhost:{server.http_port}/health", timeout=10).status_code == 200
    with serving(model_f32, *flags, "--http-plaintext", "true") as behind_a_proxy:
        assert httpx.get(f"http://127.0.0.1:{behind_a_proxy.http_port}/health", timeout=10).status_code == 200
