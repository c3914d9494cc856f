"""WSGI entry point: `cloudlet_api.wsgi:application` (uwsgi --module, or any WSGI server).

Configuration from $CLOUDLET_API_CONFIG (comma-separated files) or
/etc/cloudlet/cloudlet-api.conf; see deploy.init_application.
"""

from cloudlet_api import deploy

application = deploy.init_application()
