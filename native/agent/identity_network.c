/*
 * The clone's NIC: MAC, IPv4 address, netmask, default route.
 *
 * Through ioctls, not `ip`: every process a clone starts costs ~100 ms under
 * TCG.
 */
#define _GNU_SOURCE
#include "identity_steps.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The one Ethernet NIC sfmpi gives every VM: the first by name. */
int nic_name(char *out, size_t len)
{
    DIR *d = opendir("/sys/class/net");
    if (!d)
        return -1;
    char *names[64];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < 64)
        if (e->d_name[0] != '.' && strcmp(e->d_name, "lo") != 0)
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof names[0], cmp_names);
    int found = -1;
    for (int i = 0; i < n; i++) {
        char path[300], type[16];
        snprintf(path, sizeof path, "/sys/class/net/%s/type", names[i]);
        if (found < 0 && atoi(read_first_line(path, type, sizeof type)) == ARPHRD_ETHER) {
            snprintf(out, len, "%s", names[i]);
            found = 0;
        }
    }
    for (int i = 0; i < n; i++)
        free(names[i]);
    return found;
}

static int sockaddr_in_of(const char *address, struct sockaddr *sa)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    return inet_pton(AF_INET, address, &sin->sin_addr) == 1 ? 0 : -1;
}

int configure_network(json_object *ident, const struct identity_prep *prep, char *err, size_t errlen)
{
    const char *mac = str_field(ident, "mac"), *ip = str_field(ident, "ip"), *gw = str_field(ident, "gateway");
    json_object *prefix_obj;
    if (!mac || !ip || !gw || !json_object_object_get_ex(ident, "prefix", &prefix_obj))
        return fail(err, errlen, "identity without mac, ip, prefix or gateway");
    int prefix = json_object_get_int(prefix_obj);
    char dev[IFNAMSIZ];
    if (prep && prep->nic[0])
        snprintf(dev, sizeof dev, "%s", prep->nic);
    else if (nic_name(dev, sizeof dev) != 0)
        return fail(err, errlen, "no Ethernet interface in this VM");
    int sock = prep && prep->ioctl_sock >= 0 ? fcntl(prep->ioctl_sock, F_DUPFD_CLOEXEC, 0)
                                             : socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return fail(err, errlen, "socket: %s", strerror(errno));
    struct ifreq ifr;
    int rc = -1;
    const char *what = "";
    /* virtio-net changes its MAC live (VIRTIO_NET_F_CTRL_MAC_ADDR): QEMU's
     * receive filter follows, and the tap's nft rules expect the new one. */
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", dev);
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    unsigned char *hw = (unsigned char *)ifr.ifr_hwaddr.sa_data;
    if (sscanf(mac, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &hw[0], &hw[1], &hw[2], &hw[3], &hw[4], &hw[5]) != 6) {
        close(sock);
        return fail(err, errlen, "bad MAC address %s", mac);
    }
    what = "set MAC of";
    if (ioctl(sock, SIOCSIFHWADDR, &ifr) != 0)
        goto out;
    /* Setting the address replaces the parent's (the primary one). */
    what = "set address of";
    if (sockaddr_in_of(ip, &ifr.ifr_addr) != 0) {
        errno = EINVAL;
        goto out;
    }
    if (ioctl(sock, SIOCSIFADDR, &ifr) != 0)
        goto out;
    what = "set netmask of";
    struct sockaddr_in *mask = (struct sockaddr_in *)&ifr.ifr_netmask;
    memset(mask, 0, sizeof *mask);
    mask->sin_family = AF_INET;
    mask->sin_addr.s_addr = htonl(prefix <= 0 ? 0 : 0xFFFFFFFFu << (32 - prefix));
    if (ioctl(sock, SIOCSIFNETMASK, &ifr) != 0)
        goto out;
    /* A family network may span hosts over VXLAN, whose header takes 50 of
     * the underlay's 1500 bytes: a larger frame would be dropped silently. */
    json_object *mtu_obj;
    if (json_object_object_get_ex(ident, "mtu", &mtu_obj)) {
        int mtu = json_object_get_int(mtu_obj);
        what = "set MTU of";
        if (mtu < 576 || mtu > 9000) {
            close(sock);
            return fail(err, errlen, "bad MTU %d", mtu);
        }
        ifr.ifr_mtu = mtu;
        if (ioctl(sock, SIOCSIFMTU, &ifr) != 0)
            goto out;
    }
    what = "bring up";
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) != 0)
        goto out;
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(sock, SIOCSIFFLAGS, &ifr) != 0)
        goto out;
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    sockaddr_in_of("0.0.0.0", &rt.rt_dst);
    sockaddr_in_of("0.0.0.0", &rt.rt_genmask);
    if (sockaddr_in_of(gw, &rt.rt_gateway) != 0) {
        close(sock);
        return fail(err, errlen, "bad gateway address %s", gw);
    }
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = dev;
    /* EEXIST: the parent's route is still in place, which is fine. */
    if (ioctl(sock, SIOCADDRT, &rt) != 0 && errno != EEXIST) {
        int e = errno;
        close(sock);
        return fail(err, errlen, "add default route via %s: %s", gw, strerror(e));
    }
    rc = 0;
out:
    if (rc != 0) {
        int e = errno;
        close(sock);
        return fail(err, errlen, "%s %s: %s", what, dev, strerror(e));
    }
    close(sock);
    return 0;
}
