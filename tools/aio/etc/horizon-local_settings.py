# Horizon 27 of the all-in-one (rendered by tools/aio/up.sh into $AIO_DIR/etc/horizon/ and linked
# as openstack_dashboard/local/local_settings.py): served by uwsgi at http://127.0.0.1:8080/, static files
# collected and compressed offline into $AIO_DIR/state/horizon/static (services.sh).
from horizon.utils import secret_key
from openstack_dashboard import defaults

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
WEBROOT = "/"
STATIC_ROOT = "@AIO_DIR@/state/horizon/static"
COMPRESS_ENABLED = True
COMPRESS_OFFLINE = True
SECRET_KEY = secret_key.generate_or_read_from_file("@AIO_DIR@/state/horizon/secret_key")
# the session (with the Keystone token) in a signed cookie: nothing to share between uwsgi workers
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

OPENSTACK_HOST = "127.0.0.1"
OPENSTACK_KEYSTONE_URL = "http://127.0.0.1:5000/v3"
OPENSTACK_KEYSTONE_DEFAULT_ROLE = "member"
OPENSTACK_KEYSTONE_DEFAULT_DOMAIN = "Default"
# networking is a stand-in (tools/aio/neutron_standin.py): no router, quota or IPv6 features
OPENSTACK_NEUTRON_NETWORK = {
    "enable_router": False, "enable_quotas": False, "enable_ipv6": False,
    "enable_distributed_router": False, "enable_ha_router": False,
    "enable_fip_topology_check": False,
}

# the site's cloudlet policy file, the one cloudlet-api reads too: the panel hides what the
# service would refuse. The rules' defaults come with the plugin (its local_settings.d snippet).
POLICY_FILES = dict(defaults.POLICY_FILES, cloudlet="@AIO_DIR@/etc/cloudlet/policy.yaml")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"file": {"class": "logging.FileHandler", "formatter": "plain",
                          "filename": "@AIO_DIR@/logs/horizon.log"}},
    "root": {"handlers": ["file"], "level": "INFO"},
}
