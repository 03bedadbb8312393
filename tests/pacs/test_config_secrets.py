"""Secrets in the PACS config: never in a URL, never silently unused, never in a world-readable file
without a word. Real config files, the real loader and the real command."""

from __future__ import annotations

import os

import pytest

from cxr_deploy.pacs.config import PacsConfigError, load_pacs_config
from tests.support import run_cli


def _write(tmp_path, pacs_lines: list[str]):
    path = tmp_path / "pacs.toml"
    path.write_text("\n".join(["[local]", 'ae_title = "CXRDEPLOY"', f'spool = "{tmp_path / "spool"}"', "",
                               "[pacs]", 'ae_title = "ORTHANC"', *pacs_lines]) + "\n")
    return path


def test_credentials_in_the_dicomweb_url_are_refused_without_printing_them(tmp_path):
    config = _write(tmp_path, ['dicomweb_url = "https://cxr:s3cret-Pw@pacs.example.org/dicom-web"', 'push = "stow"'])
    with pytest.raises(PacsConfigError, match="carries credentials") as info:
        load_pacs_config(config)
    assert "s3cret-Pw" not in str(info.value)
    proc = run_cli("pacs", "push", "--config", config, tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("cxr-deploy: error: ") and "s3cret-Pw" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("url", ["ftp://pacs.example.org/dicom-web", "pacs.example.org/dicom-web"])
def test_a_dicomweb_url_must_be_http_or_https(tmp_path, url):
    with pytest.raises(PacsConfigError, match="http:// or https://"):
        load_pacs_config(_write(tmp_path, [f'dicomweb_url = "{url}"']))


@pytest.mark.parametrize("auth, key", [("none", "password_env"), ("none", "token_file"), ("bearer", "password_env"),
                                       ("basic", "token_env")])
def test_a_secret_the_chosen_auth_would_never_send_is_an_error(tmp_path, monkeypatch, auth, key):
    monkeypatch.setenv("CXR_TEST_SECRET", "x")
    lines = ['dicomweb_url = "https://pacs.example.org/dicom-web"', f'auth = "{auth}"', f'{key} = "CXR_TEST_SECRET"']
    if auth == "bearer":
        lines.append('token_env = "CXR_TEST_SECRET"')
    if auth == "basic":
        lines += ['username = "u"', 'password_env = "CXR_TEST_SECRET"']
    with pytest.raises(PacsConfigError, match=f"{key} given with auth"):
        load_pacs_config(_write(tmp_path, lines))


def test_a_secret_file_readable_by_others_is_warned_about_and_a_private_one_is_not(tmp_path, capfd):
    secret = tmp_path / "pacs.secret"
    secret.write_text("pw\n")
    lines = ['dicomweb_url = "https://pacs.example.org/dicom-web"', 'auth = "basic"', 'username = "u"',
             f'password_file = "{secret}"']
    os.chmod(secret, 0o644)
    assert load_pacs_config(_write(tmp_path, lines)).pacs.secret == "pw"
    err = capfd.readouterr().err
    assert "can be read by group or others (mode 644)" in err and "chmod 600" in err and "pw\n" not in err
    os.chmod(secret, 0o600)
    assert load_pacs_config(_write(tmp_path, lines)).pacs.secret == "pw"
    assert "warning" not in capfd.readouterr().err


def test_a_plain_config_still_loads(tmp_path):
    config = load_pacs_config(_write(tmp_path, ['dicomweb_url = "http://127.0.0.1:8042/dicom-web/"']))
    assert config.pacs.dicomweb_url == "http://127.0.0.1:8042/dicom-web" and config.pacs.secret == ""
