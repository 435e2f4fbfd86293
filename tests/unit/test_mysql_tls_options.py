"""feature_store.online.mysql.tls_options: what each `database.tls` mode asks of pymysql."""
from __future__ import annotations

import ssl

import pytest

from feature_store.online.mysql import tls_options


def test_preferred_is_pymysqls_default_and_disabled_turns_tls_off():
    assert tls_options("preferred") == {}
    assert tls_options("disabled") == {"ssl_disabled": True}


def test_required_insists_on_tls_without_checking_the_certificate():
    ctx = tls_options("required")["ssl"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_verify_checks_certificate_and_host_name():
    ctx = tls_options("verify")["ssl"]  # the system's CAs
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_bad_modes_and_ca_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="tls must be one of"):
        tls_options("yes")
    with pytest.raises(ValueError, match="only used with tls 'verify'"):
        tls_options("required", str(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match=r"TLS CA file .*ca\.pem.* does not exist"):
        tls_options("verify", str(tmp_path / "ca.pem"))
