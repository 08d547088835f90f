import platform

import pytest

from recsys.runtime.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's mallopt; other libcs keep theirs")
def test_glibc_takes_every_setting_once_per_process():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # cached: applied once
