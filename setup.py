from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

setup(
    name="shardproxy",
    version="0.1.0",
    description="A sharding, region-aware, pooling PostgreSQL proxy",
    packages=find_packages(include=["shardproxy", "shardproxy.*"]),
    ext_modules=cythonize(
        [Extension("shardproxy._hash", ["shardproxy/_hash.pyx"]),
         Extension("shardproxy._wire", ["shardproxy/_wire.pyx"]),
         Extension("shardproxy._literals", ["shardproxy/_literals.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
    python_requires=">=3.11",
    install_requires=[
        "uvloop>=0.19",
        "asyncpg>=0.29",
        "mmh3>=4.0",
        "prometheus-client>=0.19",
        "PyYAML>=6.0",
        "pydantic>=2.5",
        "pglast>=6.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-asyncio>=0.23",
            "pytest-timeout>=2.2",
            "psycopg[binary]>=3.1.18",
            "SQLAlchemy>=2.0",
            "hypothesis>=6.90",
            "cryptography>=41",  # certificates for the TLS tests
        ],
    },
    entry_points={"console_scripts": ["shardproxy=shardproxy.cli:main"]},
)
