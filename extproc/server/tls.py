"""TLS / mTLS for the ext_proc gRPC port, with certificates read from files and reloaded when they change.

gRPC's dynamic credentials call our fetcher on every new handshake; we re-read the files only when their
modification time changed, so rotation (e.g. cert-manager rewriting a Secret volume) needs no restart.
"""

from __future__ import annotations

import logging
import os

import grpc

log = logging.getLogger(__name__)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _CertFiles:
    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._mtimes = self._stat()

    def _stat(self) -> tuple[float, ...]:
        paths = [self.cert, self.key] + ([self.client_ca] if self.client_ca else [])
        return tuple(os.stat(p).st_mtime_ns for p in paths)

    def config(self) -> grpc.ServerCertificateConfiguration:
        ca = _read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(_read(self.key), _read(self.cert))], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            m = self._stat()
        except OSError as e:
            log.error("cannot stat TLS files; keeping current certificates", extra={"error": str(e)})
            return None
        if m == self._mtimes:
            return None
        try:
            cfg = self.config()
        except (OSError, ValueError) as e:
            log.error("cannot reload TLS files; keeping current certificates", extra={"error": str(e)})
            return None
        self._mtimes = m
        log.info("TLS certificates reloaded")
        return cfg


def reloading_credentials(cert: str, key: str, client_ca: str | None = None) -> grpc.ServerCredentials:
    files = _CertFiles(cert, key, client_ca)
    return grpc.dynamic_ssl_server_credentials(files.config(), files.fetch, require_client_authentication=client_ca is not None)
