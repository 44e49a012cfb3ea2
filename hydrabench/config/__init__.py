"""Settings as data: run specs, profiles, task folders a user includes, table specs."""
