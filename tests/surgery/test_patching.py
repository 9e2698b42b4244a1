"""The two private Composer functions algos wraps are checked before wrapping: a Composer whose function changed
makes ``import algos`` fail in one line naming the version and the function, instead of misbehaving later."""

import composer
import pytest
from composer.core import State
from composer.utils import checkpoint as composer_checkpoint

from algos.surgery import checkpoint_files, resume


@pytest.mark.parametrize("owner, attribute, install, name", [
    (State, "_apply_required_algorithms", resume.install, "State._apply_required_algorithms"),
    (composer_checkpoint, "_write_checkpoint_file", checkpoint_files.install,
     "composer.utils.checkpoint._write_checkpoint_file"),
])
def test_a_changed_composer_function_is_a_one_line_import_error(monkeypatch, owner, attribute, install, name):
    def changed(self_or_state, *, new_argument=None):  # as a later Composer might have it
        pass

    monkeypatch.setattr(owner, attribute, changed)
    with pytest.raises(ImportError, match=rf"^algos wraps Composer's private {name}\(.*\), but mosaicml "
                                          rf"{composer.__version__} has {name}\(self_or_state, new_argument\); "
                                          r"install mosaicml>=0.32.1,<0.33, the versions algos is tested with$"):
        install()
    assert getattr(owner, attribute) is changed  # nothing wrapped
