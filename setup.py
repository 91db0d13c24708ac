"""The compiled parts; everything else about the package is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension("shardproxy._hash", ["shardproxy/_hash.pyx"]),
            Extension("shardproxy.counters", ["shardproxy/counters.pyx"]),
            Extension("shardproxy.routing._literals", ["shardproxy/routing/_literals.pyx"]),
            Extension("shardproxy.routing._copyrows", ["shardproxy/routing/_copyrows.pyx"]),
            Extension("shardproxy.datapath._core", ["shardproxy/datapath/_core.pyx"]),
        ],
        compiler_directives={"language_level": "3"},
    ),
)
