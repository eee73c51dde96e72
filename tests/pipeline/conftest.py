"""The pipeline tests' image folder: one `data` fixture per test module, built from the module's DATA
(helpers.image_folder's arguments; its defaults when a module sets none)."""
import pytest

import helpers


@pytest.fixture(scope="module")
def data(request, tmp_path_factory):
    return helpers.image_folder(tmp_path_factory.mktemp("data"), **getattr(request.module, "DATA", {}))
