# Nova's api-paste.ini with the cloudlet filter (cloudlet_api/nova_actions.py: Elijah's server
# actions cloudlet-base and cloudlet-overlay-finish, sent to cloudlet-api as the caller):
#   sed -f etc/nova-api-paste.sed nova/api-paste.ini > /etc/nova/api-paste.ini
# The filter goes after keystonecontext (the caller is authenticated) in the v2.1 pipelines.
# Used as it is by tools/aio/up.sh, devstack/plugin.sh and cloudlet_nova/tests.
/^keystone *=/s/ keystonecontext / keystonecontext cloudlet /
$a\
\
[filter:cloudlet]\
paste.filter_factory = cloudlet_api.nova_actions:filter_factory
