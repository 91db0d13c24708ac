"""What the tests share: helpers only, no tests. Test modules import from here, never from each other."""

APP_DB = "appdb"  # owned by the `app` user, so tests can create tables in it (made by conftest's `pg` fixture)
