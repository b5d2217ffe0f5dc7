"""hntitles/uv_flags.py: pip's config becomes the uv flags that make uv install what pip would."""

import pytest

from hntitles.uv_flags import parse_config, uv_flags

THIS_MACHINE = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
"""


@pytest.mark.parametrize("text, flags", [
    # no pip config at all: PyPI with pip's best-version choice
    ("", ["--index-strategy", "unsafe-best-match"]),
    # a machine with a local CPU torch wheel and two file mirrors: every source reaches uv once
    (THIS_MACHINE, ["--constraint", "/etc/xdg/pip/constraints.txt",
                    "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                    "--find-links", "/opt/wheels", "--index-strategy", "unsafe-best-match"]),
    # PIP_INDEX_URL wins over [global] like in pip; [download] is another command's section
    ("global.index-url='https://a/simple'\n:env:.index-url='https://b/simple'\ndownload.find-links='/x'\n",
     ["--index-url", "https://b/simple", "--index-strategy", "unsafe-best-match"]),
    # [install] wins over [global]
    ("install.find-links='/i'\nglobal.find-links='/g'\n",
     ["--find-links", "/i", "--index-strategy", "unsafe-best-match"]),
    ("global.no-index='true'\n", ["--no-index", "--index-strategy", "unsafe-best-match"]),
])
def test_flags(text, flags):
    assert uv_flags(parse_config(text)) == flags


@pytest.mark.parametrize("line", [
    "global.no-binary=':all:'",   # uv would take wheels pip refuses
    "install.pre='true'",         # pre-releases change the resolution
    "global.trusted-host='mirror'",
])
def test_options_uv_cannot_mirror_send_the_install_to_pip(line):
    with pytest.raises(ValueError, match="no uv equivalent"):
        uv_flags(parse_config(line))
