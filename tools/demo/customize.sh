# shellcheck shell=sh
# Customisation run inside the test guest (busybox sh on its serial console) by
# `cloudlet overlay create --script`. It changes the disk and leaves state that lives only in RAM.
echo "hello from the cloudlet overlay" > /data/www/index.html
mkdir -p /data/www/app && dd if=/dev/urandom of=/data/www/app/blob bs=4k count=256 2>/dev/null
mkdir -p /ram/www
echo "ram-only state, written before capture: $(cat /proc/sys/kernel/random/boot_id)" > /ram/www/index.html
httpd -p 8080 -h /ram/www
sync
