"""The one C extension: the keeper process of a launch (see _keeper.c's header for why).
Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "forgeone_isolate._sys._keeper",
            sources=["forgeone_isolate/_sys/_keeper.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            # no lazy binding: nothing resolved while the keeper shares PID 1's memory
            extra_link_args=["-Wl,-z,now"],
        )
    ]
)
