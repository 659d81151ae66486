"""The Wi-Fi keyfile as NetworkManager reads it: a GLib key file, whose values escape a backslash, line breaks,
tabs and a leading space (GLib reference, "Desktop Entry"-style key files: https://docs.gtk.org/glib/struct.KeyFile.html,
and the escapes of g_key_file_parse_value_as_string)."""

from __future__ import annotations

from appliance.firstboot.apply import WIFI, write_wifi
from appliance.firstboot.settings import Wifi


def _values(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_plain_names_are_written_as_they_are(tmp_path):
    write_wifi(tmp_path, Wifi(ssid="community-net", psk="wifi-passphrase-123"))
    values = _values((tmp_path / WIFI).read_text())
    assert (values["ssid"], values["psk"], values["key-mgmt"]) == ("community-net", "wifi-passphrase-123", "wpa-psk")


def test_backslashes_and_a_leading_space_are_escaped(tmp_path):
    write_wifi(tmp_path, Wifi(ssid=" river net", psk="a\\b c\td"))
    values = _values((tmp_path / WIFI).read_text())
    assert values["ssid"] == "\\sriver net", "a leading space would be stripped by the reader"
    assert values["psk"] == "a\\\\b c\\td"


def test_an_open_network_has_no_security_section(tmp_path):
    write_wifi(tmp_path, Wifi(ssid="open", psk=""))
    assert "[wifi-security]" not in (tmp_path / WIFI).read_text()
