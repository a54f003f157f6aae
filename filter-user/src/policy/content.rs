//! What an EWS request touches: its operation and that operation's class, the data types
//! (e-mail, calendar, contacts, tasks, notes), who it acts for, and what ewsgate has learnt
//! of opaque IDs from earlier responses.

use std::collections::{HashMap, VecDeque};

use crate::{
    model::ews::{DataSet, Meetings, OpInfo, Shape},
    soap::{self, Folder},
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
        _ => item_element(&item.element, meetings),
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

/// The data a folder class holds (`IPF.Appointment`, ...); unknown classes hold mail.
pub fn folder_class(class: &str) -> DataSet {
    let is = |prefix: &str| class_is(class, prefix);
    if is("ipf.appointment") {
        DataSet::CALENDAR
    } else if is("ipf.contact") {
        DataSet::CONTACTS
    } else if is("ipf.task") {
        DataSet::TASKS
    } else if is("ipf.stickynote") {
        DataSet::NOTES
    } else {
        DataSet::EMAIL
    }
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

/// ID → type, keyed by mailbox and ID (EWS IDs are case-sensitive), bounded: the oldest
/// entries go first.
pub struct IdCache {
    map: HashMap<(IdKind, String, String), Known>,
    order: VecDeque<(IdKind, String, String)>,
    capacity: usize,
}

impl IdCache {
    pub fn new(capacity: usize) -> IdCache {
        IdCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn put(&mut self, kind: IdKind, mailbox: &str, id: &str, known: Known) {
        if id.is_empty() || id.len() > 1024 {
            return;
        }
        let key = (kind, mailbox.to_string(), id.to_string());
        if self.map.insert(key.clone(), known).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }

    fn get(&self, kind: IdKind, mailbox: &str, id: &str) -> Option<&Known> {
        self.map.get(&(kind, mailbox.to_string(), id.to_string()))
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

    /// Items that move, are copied or deleted get new IDs or none: forget them. (Their
    /// entries stay in `order` until they age out; `put` tolerates that.)
    pub fn forget(&mut self, mailbox: &str, items: &[String]) {
        for id in items {
            for kind in [IdKind::Item, IdKind::Folder] {
                self.map.remove(&(kind, mailbox.to_string(), id.clone()));
            }
        }
    }

    /// Learns from a response: items, the attachments they list, and folders.
    pub fn learn(&mut self, mailbox: &str, response: &soap::Response, meetings: Meetings) {
        for m in &response.messages {
            for item in &m.items {
                self.learn_item(mailbox, item, meetings);
            }
            for f in &m.folders {
                let data = f.class.as_deref().map_or_else(
                    || match f.element.as_str() {
                        "CalendarFolder" => DataSet::CALENDAR,
                        "ContactsFolder" => DataSet::CONTACTS,
                        "TasksFolder" => DataSet::TASKS,
                        "SearchFolder" => DataSet::ALL,
                        _ => DataSet::EMAIL,
                    },
                    folder_class,
                );
                self.put(IdKind::Folder, mailbox, &f.id, Known { data, root: None });
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
    if req.sends {
        t.data = t.data.union(DataSet::EMAIL);
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
            None if shape == Shape::Folders => Some(DataSet::NONE),
            None => {
                t.unresolved = true;
                None
            }
        },
    };
    match data {
        Some(d) => t.data = t.data.union(d),
        // Roots and search folders: metadata is neutral, items may be anything.
        None if shape == Shape::Folders => {}
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

pub fn access(req: &soap::Request, anchor: Option<&str>, user: Option<&str>) -> Access {
    let mut delegate = None;
    let named = req.folders.iter().filter_map(|f| match f {
        Folder::Distinguished {
            mailbox: Some(m), ..
        } => Some(m.as_str()),
        _ => None,
    });
    for m in named.chain(anchor) {
        if !own_mailbox(m, user) {
            delegate = Some(m.to_ascii_lowercase());
        }
    }
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

/// Judges each response message under the rule that allowed the request: `Some(reason)`
/// for a message whose items or attachments the rule does not allow, or whose types
/// ewsgate cannot tell.
pub fn judge_response(
    response: &soap::Response,
    inspect: &crate::model::rules::Inspect,
    cache: &IdCache,
    mailbox: &str,
    meetings: Meetings,
) -> Vec<Option<String>> {
    response
        .messages
        .iter()
        .map(|m| judge_message(m, inspect, cache, mailbox, meetings))
        .collect()
}

fn judge_message(
    m: &soap::Message,
    inspect: &crate::model::rules::Inspect,
    cache: &IdCache,
    mailbox: &str,
    meetings: Meetings,
) -> Option<String> {
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

fn judge_item(item: &soap::Item, allowed: DataSet, meetings: Meetings) -> Option<String> {
    match item_data(item, meetings) {
        None => Some(format!(
            "{} of class {}: data type unresolved",
            item.element,
            item.class.as_deref().unwrap_or("(none)")
        )),
        Some(d) if !d.within(allowed) => Some(format!(
            "{} ({}) is not allowed",
            d,
            item.class.as_deref().unwrap_or(&item.element)
        )),
        Some(_) => None,
    }
}
