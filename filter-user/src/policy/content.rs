//! What an EWS request touches: its operation and that operation's class, the data types
//! (e-mail, calendar, contacts, tasks, notes), who it acts for, and what ewsgate has learnt
//! of opaque IDs from earlier responses.

use quick_cache::{unsync, Equivalent};

use crate::{
    model::{
        ews::{DataSet, Meetings, OpInfo, Shape},
        rules::Inspect,
    },
    soap::{self, Folder, Verdict},
};

/// The data type of an `ItemClass`; `None` for classes ewsgate does not know.
/// `class` is `prefix` or starts with `prefix.`, ignoring ASCII case.
fn class_is(class: &str, prefix: &str) -> bool {
    let c = class.as_bytes();
    c.len() >= prefix.len()
        && c[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        && (c.len() == prefix.len() || c[prefix.len()] == b'.')
}

pub fn item_class(class: &str, meetings: Meetings) -> Option<DataSet> {
    let is = |prefix: &str| class_is(class, prefix);
    if is("ipm.schedule.meeting") {
        Some(meetings.0)
    } else if is("ipm.note") || is("ipm.post") || is("report") || is("ipm.outlook.recall") {
        Some(DataSet::EMAIL)
    } else if is("ipm.appointment") {
        Some(DataSet::CALENDAR)
    } else if is("ipm.contact") || is("ipm.distlist") {
        Some(DataSet::CONTACTS)
    } else if is("ipm.task") || is("ipm.taskrequest") {
        Some(DataSet::TASKS)
    } else if is("ipm.stickynote") {
        Some(DataSet::NOTES)
    } else {
        None
    }
}

/// The types an item element can hold. `t:Message` holds e-mail and notes alike.
pub fn item_element(element: &str, meetings: Meetings) -> Option<DataSet> {
    Some(match element {
        "Message" => DataSet::EMAIL.union(DataSet::NOTES),
        "PostItem" => DataSet::EMAIL,
        "CalendarItem" => DataSet::CALENDAR,
        "MeetingRequest" | "MeetingResponse" | "MeetingCancellation" | "MeetingMessage" => {
            meetings.0
        }
        "Contact" | "DistributionList" => DataSet::CONTACTS,
        "Task" => DataSet::TASKS,
        "AcceptItem"
        | "TentativelyAcceptItem"
        | "DeclineItem"
        | "CancelCalendarItem"
        | "RemoveItem"
        | "CalendarView"
        | "OccurrenceItemId"
        | "RecurringMasterItemId" => DataSet::CALENDAR,
        "ReplyToItem" | "ReplyAllToItem" | "ForwardItem" | "SuppressReadReceipt" => DataSet::EMAIL,
        "ContactsView" => DataSet::CONTACTS,
        _ => return None,
    })
}

/// An item's type as a response shows it: its class, else its element.
pub fn item_data(item: &soap::Item, meetings: Meetings) -> Option<DataSet> {
    match &item.class {
        Some(c) if !c.is_empty() => item_class(c, meetings),
        _ => item_element(item.element, meetings),
    }
}

/// The data a distinguished folder holds; `None` for roots and search folders (any type).
pub fn distinguished(id: &str) -> Option<DataSet> {
    Some(match id {
        "inbox"
        | "sentitems"
        | "drafts"
        | "outbox"
        | "junkemail"
        | "deleteditems"
        | "conversationhistory" => DataSet::EMAIL,
        _ if id.starts_with("archive") => DataSet::EMAIL,
        "calendar" => DataSet::CALENDAR,
        "contacts" | "mycontacts" | "quickcontacts" | "recipientcache" | "peopleconnect"
        | "imcontactlist" | "directory" => DataSet::CONTACTS,
        "tasks" | "todosearch" => DataSet::TASKS,
        "notes" => DataSet::NOTES,
        _ => return None,
    })
}

/// The data a folder class holds (`IPF.Appointment`, ...); `None` for classes ewsgate
/// does not know (`IPF.Journal`, `IPF.Configuration`, ...).
pub fn folder_class(class: &str) -> Option<DataSet> {
    let is = |prefix: &str| class_is(class, prefix);
    if is("ipf.note") {
        Some(DataSet::EMAIL)
    } else if is("ipf.appointment") {
        Some(DataSet::CALENDAR)
    } else if is("ipf.contact") {
        Some(DataSet::CONTACTS)
    } else if is("ipf.task") {
        Some(DataSet::TASKS)
    } else if is("ipf.stickynote") {
        Some(DataSet::NOTES)
    } else {
        None
    }
}

/// The data a folder in an answer holds: its class, and what its element says
/// (`CalendarFolder`, ...). A search folder holds anything; a plain `t:Folder` without a
/// class or with one ewsgate does not know holds what nobody can tell (`None`).
pub fn folder_data(f: &soap::FolderInfo) -> Option<DataSet> {
    let element = match f.element {
        "CalendarFolder" => Some(DataSet::CALENDAR),
        "ContactsFolder" => Some(DataSet::CONTACTS),
        "TasksFolder" => Some(DataSet::TASKS),
        "SearchFolder" => return Some(DataSet::ALL),
        _ => None,
    };
    let class = f
        .class
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(folder_class);
    match (class, element) {
        // A class ewsgate does not know: not even a typed element says what is inside.
        (Some(None), _) => None,
        (Some(Some(c)), e) => Some(c.union(e.unwrap_or(DataSet::NONE))),
        (None, e) => e,
    }
}

/// Distinguished folders that only contain other folders: `GetFolder` of one shows no data
/// of any type, so its answer is neutral.
pub fn is_root(id: &str) -> bool {
    matches!(
        id,
        "root" | "msgfolderroot" | "publicfoldersroot" | "archiveroot" | "archivemsgfolderroot"
    )
}

/// The response messages of a `GetFolder` that answer for a root folder (the answer holds
/// one message per folder asked for, in order).
pub fn root_answers(req: &soap::Request) -> Vec<usize> {
    if req.operation != "GetFolder" {
        return Vec::new();
    }
    req.folders
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(f, Folder::Distinguished { id, .. } if is_root(id)))
        .map(|(i, _)| i)
        .collect()
}

/// What ewsgate learnt of an ID from Exchange's responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub data: DataSet,
    /// For an attachment: the item it belongs to.
    pub root: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum IdKind {
    Item,
    Attachment,
    Folder,
}

/// A cache key: EWS IDs are case-sensitive, mailboxes are lower-case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    kind: IdKind,
    mailbox: String,
    id: String,
}

/// A key to look up with, borrowed from the request; hashes as [`Key`] does.
#[derive(Hash)]
struct KeyRef<'a> {
    kind: IdKind,
    mailbox: &'a str,
    id: &'a str,
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.kind == key.kind && self.mailbox == key.mailbox && self.id == key.id
    }
}

/// The longest ID ewsgate keeps (Exchange's are well under 512 bytes).
const MAX_ID: usize = 1024;

/// ID → type, keyed by mailbox and ID, bounded in entries (and so in memory: IDs are
/// bounded too). Eviction, and forgetting, are quick_cache's (S3-FIFO): nothing outlives
/// its entry.
pub struct IdCache {
    map: unsync::Cache<Key, Known>,
}

impl IdCache {
    pub fn new(capacity: usize) -> IdCache {
        IdCache {
            map: unsync::Cache::new(capacity.max(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes the cache holds: its own structures (entries and index, as quick_cache counts
    /// them) and the keys' and values' text.
    pub fn footprint(&self) -> usize {
        let text: usize = self
            .map
            .iter()
            .map(|(k, v)| k.mailbox.len() + k.id.len() + v.root.as_ref().map_or(0, String::len))
            .sum();
        self.map.memory_used().total() + text
    }

    fn put(&mut self, kind: IdKind, mailbox: &str, id: &str, known: Known) {
        if id.is_empty() || id.len() > MAX_ID {
            return;
        }
        // Every answer names the IDs it names again: an entry known already is updated in
        // place, without copying its key.
        if let Some(mut entry) = self.map.get_mut(&KeyRef { kind, mailbox, id }) {
            *entry = known;
            return;
        }
        let key = Key {
            kind,
            mailbox: mailbox.to_string(),
            id: id.to_string(),
        };
        self.map.insert(key, known);
    }

    fn get(&self, kind: IdKind, mailbox: &str, id: &str) -> Option<&Known> {
        self.map.get(&KeyRef { kind, mailbox, id })
    }

    pub fn item(&self, mailbox: &str, id: &str) -> Option<&Known> {
        self.get(IdKind::Item, mailbox, id)
    }

    pub fn attachment(&self, mailbox: &str, id: &str) -> Option<&Known> {
        self.get(IdKind::Attachment, mailbox, id)
    }

    pub fn folder(&self, mailbox: &str, id: &str) -> Option<&Known> {
        self.get(IdKind::Folder, mailbox, id)
    }

    /// Items that move, are copied, deleted or changed get new IDs, or none, or another
    /// class: forget them.
    pub fn forget(&mut self, mailbox: &str, items: &[String]) {
        for id in items {
            for kind in [IdKind::Item, IdKind::Folder] {
                self.map.remove(&KeyRef { kind, mailbox, id });
            }
        }
    }

    fn forget_folders(&mut self, mailbox: &str, folders: &[Folder]) {
        for f in folders {
            if let Folder::Opaque(id) = f {
                self.map.remove(&KeyRef {
                    kind: IdKind::Folder,
                    mailbox,
                    id,
                });
            }
        }
    }

    /// Learns from an inspected response: items, the attachments they list, and folders
    /// whose type their answer shows (not the roots a `GetFolder` asked for).
    pub fn learn(
        &mut self,
        mailbox: &str,
        response: &soap::Response,
        inspect: &Inspect,
        meetings: Meetings,
    ) {
        for (i, m) in response.messages.iter().enumerate() {
            for item in &m.items {
                self.learn_item(mailbox, item, meetings);
            }
            if inspect.roots.contains(&i) {
                continue;
            }
            for f in &m.folders {
                if let Some(data) = folder_data(f) {
                    self.put(IdKind::Folder, mailbox, &f.id, Known { data, root: None });
                }
            }
        }
    }

    fn learn_item(&mut self, mailbox: &str, item: &soap::Item, meetings: Meetings) {
        let (Some(id), Some(data)) = (&item.id, item_data(item, meetings)) else {
            return;
        };
        self.put(IdKind::Item, mailbox, id, Known { data, root: None });
        for a in &item.attachments {
            let known = Known {
                data,
                root: Some(id.clone()),
            };
            self.put(IdKind::Attachment, mailbox, a, known);
        }
    }
}

/// Whether a request changes what ewsgate has learnt of the IDs it names.
pub fn changes_ids(req: &soap::Request, info: Option<&OpInfo>) -> bool {
    info.is_some_and(|i| i.shape == Shape::Changes) || changes_folders(req)
}

fn changes_folders(req: &soap::Request) -> bool {
    matches!(
        req.operation.as_str(),
        "UpdateFolder" | "MoveFolder" | "DeleteFolder"
    )
}

/// Forgets what a request that changes the store makes stale: the items it names (moved,
/// copied, deleted and changed items get new IDs or classes), and the folders a folder
/// update, move or delete names (a folder's class can change).
pub fn forget_changed(cache: &mut IdCache, mailbox: &str, req: &soap::Request) {
    cache.forget(mailbox, &req.items);
    if changes_folders(req) {
        cache.forget_folders(mailbox, &req.folders);
    }
}

/// The data a request touches, as far as ewsgate can tell before forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    pub data: DataSet,
    /// Some ID or folder is opaque and unknown: the data may be anything.
    pub unresolved: bool,
}

/// Judges the request's own signals and the IDs it names against the cache.
pub fn touched(
    req: &soap::Request,
    op: &OpInfo,
    cache: &IdCache,
    mailbox: &str,
    meetings: Meetings,
) -> Touch {
    let mut t = Touch {
        data: op.data.unwrap_or(DataSet::NONE),
        unresolved: false,
    };
    if op.shape == Shape::Fixed {
        return t;
    }
    let views: Vec<DataSet> = req
        .shown
        .iter()
        .filter(|s| matches!(s.as_str(), "CalendarView" | "ContactsView"))
        .filter_map(|s| item_element(s, meetings))
        .collect();
    // A calendar or contacts view returns only items of its type, whatever the folder.
    if views.is_empty() {
        for f in &req.folders {
            folder_touch(&mut t, f, op.shape, cache, mailbox);
        }
    }
    for v in views {
        t.data = t.data.union(v);
    }
    for s in &req.shown {
        if let Some(d) = item_element(s, meetings) {
            t.data = t.data.union(d);
        }
    }
    for c in &req.item_classes {
        match item_class(c, meetings) {
            Some(d) => t.data = t.data.union(d),
            None => t.unresolved = true,
        }
    }
    // A new message's class decides between e-mail and notes.
    if req.operation == "CreateItem" && !req.item_classes.is_empty() {
        t.data = t.data.without(DataSet::EMAIL.union(DataSet::NOTES));
        for c in &req.item_classes {
            if let Some(d) = item_class(c, meetings) {
                t.data = t.data.union(d);
            }
        }
    }
    if req.sends_mail {
        t.data = t.data.union(DataSet::EMAIL);
    }
    if req.sends_meetings {
        t.data = t.data.union(meetings.0);
    }
    for id in &req.items {
        match cache.item(mailbox, id) {
            Some(k) => t.data = t.data.union(k.data),
            None => t.unresolved = true,
        }
    }
    for id in &req.attachments {
        match cache.attachment(mailbox, id) {
            Some(k) => t.data = t.data.union(k.data),
            None => t.unresolved = true,
        }
    }
    t
}

fn folder_touch(t: &mut Touch, f: &Folder, shape: Shape, cache: &IdCache, mailbox: &str) {
    let data = match f {
        Folder::Distinguished { id, .. } => distinguished(id),
        Folder::Opaque(id) => match cache.folder(mailbox, id) {
            Some(k) => Some(k.data),
            // Folder metadata reveals no items: an unknown folder is neutral there.
            None if shape.folders() => Some(DataSet::NONE),
            None => {
                t.unresolved = true;
                None
            }
        },
    };
    match data {
        Some(d) => t.data = t.data.union(d),
        // Roots and search folders: metadata is neutral, items may be anything.
        None if shape.folders() => {}
        None => t.data = DataSet::ALL,
    }
}

/// Whose mailbox a request acts on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    pub impersonation: Option<String>,
    /// A mailbox other than the caller's own, from folder IDs or `X-AnchorMailbox`.
    pub delegate: Option<String>,
}

impl Access {
    /// The mailbox the request acts on, as the cache key: lower-case.
    pub fn mailbox<'a>(&'a self, user: Option<&'a str>) -> String {
        self.impersonation
            .as_deref()
            .or(self.delegate.as_deref())
            .or(user)
            .unwrap_or("")
            .to_ascii_lowercase()
    }
}

/// Any mailbox the request names to act on, or `X-AnchorMailbox` names, other than the
/// caller's own is delegate access; the first such is the one audited.
pub fn access(req: &soap::Request, anchor: Option<&str>, user: Option<&str>) -> Access {
    let named = req.mailboxes.iter().map(String::as_str);
    let delegate = named
        .chain(anchor)
        .find(|m| !own_mailbox(m, user))
        .map(str::to_ascii_lowercase);
    Access {
        impersonation: req.impersonation.clone(),
        delegate,
    }
}

/// Whether `mailbox` is the caller's own: the same address, or for a caller known only as
/// `DOMAIN\name` or `name` (NTLM), a mailbox whose local part is that name.
pub fn own_mailbox(mailbox: &str, user: Option<&str>) -> bool {
    let Some(user) = user else { return false };
    let (m, u) = (mailbox.to_ascii_lowercase(), user.to_ascii_lowercase());
    if u.contains('@') {
        return m == u;
    }
    let name = u.rsplit('\\').next().unwrap_or(&u);
    m.split('@').next() == Some(name)
}

/// Judges each response message under the rule that allowed the request: a message is
/// withheld whole when an item or attachment in it is not allowed, when ewsgate cannot tell
/// its type, or when the walker found an element it does not classify; a folder the rule
/// does not allow is cut from a listing, and withholds a `GetFolder` message.
pub fn judge_response(
    response: &soap::Response,
    inspect: &Inspect,
    cache: &IdCache,
    mailbox: &str,
    meetings: Meetings,
) -> Vec<Verdict> {
    response
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let withhold = judge_message(m, inspect, cache, mailbox, meetings);
            if withhold.is_some() || inspect.roots.contains(&i) {
                return Verdict {
                    withhold,
                    cut: Vec::new(),
                };
            }
            judge_folders(m, inspect.data)
        })
        .collect()
}

fn judge_message(
    m: &soap::Message,
    inspect: &Inspect,
    cache: &IdCache,
    mailbox: &str,
    meetings: Meetings,
) -> Option<String> {
    if let Some(element) = &m.unclassified {
        return Some(format!("unclassified element {element}"));
    }
    let token = inspect.token_item.as_deref();
    for item in &m.items {
        if let Some(why) = judge_item(item, inspect.data, meetings) {
            return Some(why);
        }
        if token.is_some() && item.id.as_deref() != token {
            return Some("the item is outside the callback token's scope".into());
        }
    }
    for a in &m.attachments {
        let Some(known) = a.id.as_deref().and_then(|id| cache.attachment(mailbox, id)) else {
            return Some("attachment of an item ewsgate has not seen: data type unresolved".into());
        };
        if !known.data.within(inspect.data) {
            return Some(format!("attachment of {} is not allowed", known.data));
        }
        if token.is_some() && known.root.as_deref() != token {
            return Some("the attachment is outside the callback token's scope".into());
        }
        if let Some(why) = a
            .item
            .as_ref()
            .and_then(|i| judge_item(i, inspect.data, meetings))
        {
            return Some(why);
        }
    }
    None
}

/// An item and every item inside it.
fn judge_item(item: &soap::Item, allowed: DataSet, meetings: Meetings) -> Option<String> {
    let why = match item_data(item, meetings) {
        None => Some(format!(
            "{} of class {}: data type unresolved",
            item.element,
            item.class.as_deref().unwrap_or("(none)")
        )),
        Some(d) if !d.within(allowed) => Some(format!(
            "{} ({}) is not allowed",
            d,
            item.class.as_deref().unwrap_or(item.element)
        )),
        Some(_) => None,
    };
    why.or_else(|| {
        item.embedded
            .iter()
            .find_map(|i| judge_item(i, allowed, meetings))
    })
}

fn judge_folders(m: &soap::Message, allowed: DataSet) -> Verdict {
    let mut v = Verdict::default();
    for (i, f) in m.folders.iter().enumerate() {
        let why = match folder_data(f) {
            None => format!(
                "folder of class {}: data type unresolved",
                f.class.as_deref().unwrap_or("(none)")
            ),
            Some(d) if !d.within(allowed) => format!("a folder of {d} is not allowed"),
            Some(_) => continue,
        };
        if f.listed {
            v.cut.push(i);
        } else {
            v.withhold.get_or_insert(why);
        }
    }
    if v.withhold.is_some() {
        v.cut.clear();
    }
    v
}

/// What a judged response became.
pub struct Filtered {
    /// The response to send, when anything was withheld.
    pub body: Option<Vec<u8>>,
    /// Messages withheld and folders cut.
    pub withheld: usize,
    /// For the audit line: what was withheld, and the first reason.
    pub reason: String,
}

/// Applies the verdicts to the response.
pub fn filter(bytes: &[u8], response: &soap::Response, verdicts: &[Verdict]) -> Filtered {
    let messages = verdicts.iter().filter(|v| v.withhold.is_some()).count();
    let folders: usize = verdicts
        .iter()
        .filter(|v| v.withhold.is_none())
        .map(|v| v.cut.len())
        .sum();
    if messages + folders == 0 {
        return Filtered {
            body: None,
            withheld: 0,
            reason: String::new(),
        };
    }
    let first = verdicts
        .iter()
        .find_map(|v| v.withhold.as_deref())
        .unwrap_or("folders of types the rule does not allow");
    let what = match (messages, folders) {
        (m, 0) => format!("{m} response message(s) withheld"),
        (0, f) => format!("{f} folder(s) withheld"),
        (m, f) => format!("{m} response message(s) and {f} folder(s) withheld"),
    };
    Filtered {
        body: Some(soap::rewrite(bytes, response, verdicts)),
        withheld: messages + folders,
        reason: format!("forwarded; {what}: {first}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{FolderInfo, Item, Message, Response};

    fn items(ids: &[&str]) -> Response {
        let items = ids
            .iter()
            .map(|id| Item {
                id: Some(id.to_string()),
                element: "CalendarItem",
                class: Some("IPM.Appointment".into()),
                ..Default::default()
            })
            .collect();
        Response {
            messages: vec![Message {
                items,
                ..Default::default()
            }],
            fault: false,
        }
    }

    fn inspect(data: DataSet) -> Inspect {
        Inspect {
            data,
            token_item: None,
            roots: Vec::new(),
        }
    }

    #[test]
    fn learning_and_forgetting_the_same_ids_over_and_over_keeps_the_cache_bounded() {
        let mut cache = IdCache::new(64);
        let all = inspect(DataSet::ALL);
        let meetings = Meetings::default();
        for i in 0..64 {
            cache.learn(
                "a@example.org",
                &items(&[&format!("AAMk-{i:05}")]),
                &all,
                meetings,
            );
        }
        let full = cache.footprint();
        // A client moving and deleting items: each learnt, then forgotten.
        for i in 0..20_000 {
            let id = format!("AAMk-{:05}", i % 5_000);
            cache.learn("a@example.org", &items(&[&id]), &all, meetings);
            assert!(cache.item("a@example.org", &id).is_some());
            cache.forget("a@example.org", &[id]);
        }
        assert!(cache.len() <= 64, "{} entries", cache.len());
        let after = cache.footprint();
        assert!(after <= full, "{after} bytes after, {full} when full");
    }

    fn folder(id: &str, element: &'static str, class: Option<&str>) -> FolderInfo {
        FolderInfo {
            id: id.into(),
            element,
            class: class.map(str::to_string),
            listed: true,
            ..Default::default()
        }
    }

    #[test]
    fn folders_are_judged_by_class_and_element_and_unknown_ones_are_withheld() {
        let listing = Response {
            messages: vec![Message {
                folders: vec![
                    folder("F1", "CalendarFolder", Some("IPF.Appointment")),
                    folder("F2", "Folder", Some("IPF.StickyNote")),
                    folder("F3", "Folder", None),
                    folder("F4", "ContactsFolder", None),
                    folder("F5", "Folder", Some("IPF.Journal")),
                    folder("F6", "SearchFolder", Some("IPF.Appointment")),
                    folder("F7", "Folder", Some("IPF.Contact.Contoso")),
                ],
                ..Default::default()
            }],
            fault: false,
        };
        let allowed = inspect(DataSet::CALENDAR.union(DataSet::CONTACTS));
        let cache = IdCache::new(10);
        let v = judge_response(&listing, &allowed, &cache, "", Meetings::default());
        assert_eq!(v[0].withhold, None);
        assert_eq!(v[0].cut, vec![1, 2, 4, 5]);
        // What the answer shows is learnt; a folder of unknown type is not.
        let mut cache = IdCache::new(10);
        cache.learn("", &listing, &allowed, Meetings::default());
        let learnt = |id| cache.folder("", id).map(|k| k.data);
        assert_eq!(learnt("F2"), Some(DataSet::NOTES));
        assert_eq!(learnt("F4"), Some(DataSet::CONTACTS));
        assert_eq!((learnt("F3"), learnt("F5")), (None, None));
        // GetFolder: the folder asked for withholds its message, unless it is a root.
        let mut asked = listing.clone();
        asked.messages[0].folders = vec![FolderInfo {
            listed: false,
            ..folder("F3", "Folder", None)
        }];
        asked.messages.push(asked.messages[0].clone());
        let roots = Inspect {
            roots: vec![1],
            ..allowed
        };
        let v = judge_response(&asked, &roots, &cache, "", Meetings::default());
        assert!(v[0]
            .withhold
            .as_deref()
            .unwrap()
            .contains("data type unresolved"));
        assert!(v[1].passes());
    }

    #[test]
    fn unclassified_elements_and_embedded_items_withhold_their_message() {
        let cache = IdCache::new(10);
        let calendar = inspect(DataSet::CALENDAR);
        let mut r = items(&["C1"]);
        r.messages.push(r.messages[0].clone());
        r.messages[0].unclassified = Some("t:ReferenceAttachment".into());
        r.messages[1].items[0].embedded.push(Item {
            element: "Message",
            class: Some("IPM.Note".into()),
            ..Default::default()
        });
        let v = judge_response(&r, &calendar, &cache, "", Meetings::default());
        assert_eq!(
            v[0].withhold.as_deref(),
            Some("unclassified element t:ReferenceAttachment")
        );
        assert_eq!(
            v[1].withhold.as_deref(),
            Some("email (IPM.Note) is not allowed")
        );
    }
}
